"""Every argument of every entry point has help, and ``--help`` shows its default (issue #28, one CLI convention).

The parsers are taken from the real entry points: ``build_parser()`` where there is one, else ``parse_args`` is run
with ``ArgumentParser.parse_args`` intercepted, so the walk sees exactly the parser a user gets."""
from __future__ import annotations

import argparse
import importlib

import pytest


class _Caught(Exception):
    pass


def _parser(module: str) -> argparse.ArgumentParser:
    mod = importlib.import_module(module)
    if hasattr(mod, "build_parser"):
        return mod.build_parser()
    seen = []

    def grab(self, *a, **k):
        seen.append(self)
        raise _Caught

    orig = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(_Caught):
            mod.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = orig
    return seen[0]


def _walk(p: argparse.ArgumentParser, name: str):
    """``(parser name, parser, action)`` for every action of ``p`` and its sub-commands."""
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for cmd, sp in a.choices.items():
                yield from _walk(sp, f"{name} {cmd}")
        elif not isinstance(a, argparse._HelpAction):
            yield name, p, a


ENTRY_POINTS = ["study.scaling_law", "study.mutransfer", "study.config_search", "study.finetune", "analysis.cli",
                "data.convert", "study.launch_local", "study.represent", "study.diversity", "study.size_task"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_argument_has_help_and_shows_its_default(module):
    p = _parser(module)
    missing, no_default = [], []
    for name, parser, a in _walk(p, module):
        if a.help == argparse.SUPPRESS:  # hidden deprecated aliases
            continue
        flag = "/".join(a.option_strings) or a.dest
        if not (a.help or "").strip():
            missing.append(f"{name} {flag}")
            continue
        d = a.default
        if d is None or d is False or d == [] or d == argparse.SUPPRESS or a.required:
            continue
        text = parser._get_formatter()._get_help_string(a)
        if "%(default)" not in text and str(d) not in text:
            no_default.append(f"{name} {flag} (default {d!r})")
    assert not missing, f"arguments without help: {missing}"
    assert not no_default, f"--help does not show these defaults: {no_default}"
    # the parser's help renders (a % in a help string would break it)
    assert p.format_help()


@pytest.mark.parametrize("module,default", [("study.mutransfer", "mutransfer"), ("study.config_search",
                                                                               "config-search"),
                                            ("study.finetune", "finetune")])
def test_study_name_help_names_no_preset_where_there_is_none(module, default):
    p = _parser(module)
    a = next(a for a in p._actions if a.dest == "study_name")
    assert a.default == default and "preset" not in a.help


@pytest.mark.parametrize("module", ["study.scaling_law", "study.mutransfer", "study.config_search",
                                    "study.finetune", "study.diversity"])
def test_study_entry_points_agree_on_names(module):
    p = _parser(module)
    opts = {o for a in p._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
    assert {"--storage", "--study-name", "--address", "--num-cpus", "--manifest"} <= opts
    assert next(a for a in p._actions if a.dest == "storage").default == "studies"


def test_finetune_old_spellings_still_work_with_a_warning(capsys):
    from study.finetune import parse_args

    a = parse_args(["--study", "old", "--ray-address", "1.2.3.4:6379", "--ray-cpus", "3"])
    assert (a.study_name, a.address, a.num_cpus) == ("old", "1.2.3.4:6379", 3)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --study is deprecated; use --study-name",
                   "warning: --ray-address is deprecated; use --address",
                   "warning: --ray-cpus is deprecated; use --num-cpus"]
    assert "--ray-cpus" not in _parser("study.finetune").format_help()
