"""What every study entry point's command line shares: the help formatter, hidden deprecated aliases, and
help that names the entry point's own default (issue #28: one CLI convention).

Imports nothing but ``argparse`` and ``sys``, so ``--help`` stays instant. ``study.runner.add_common_args``
(``--study-name``, ``--storage``, ``--address``, ``--num-cpus``, ...) belongs here once the runner refactor lands.
"""
from __future__ import annotations

import argparse
import sys


def _names_default(help_text: str | None) -> bool:
    """The help text already says its default (``... (default: X)``, ``default: X``)."""
    return any(k in (help_text or "") for k in ("(default", "default:"))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (docstrings with command examples) and every option's default; nothing is
    appended where the default is None or a flag's False, or where the help text already names its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or _names_default(action.help):
            return action.help
        return super()._get_help_string(action)


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: sets the new option's value and prints a one-line warning.

    ``ap.add_argument("--study", dest="study_name", action=DeprecatedAlias, new="--study-name")``
    """

    def __init__(self, option_strings, dest, new: str = "", **kw):
        kw.pop("help", None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def set_study_name(ap: argparse.ArgumentParser, default: str) -> None:
    """Give ``--study-name`` (from ``study.runner.add_common_args``) this tool's own default and help (the common
    help speaks of a preset, which only ``scaling_law`` has)."""
    for a in ap._actions:
        if a.dest == "study_name":
            a.default = default
            a.help = "name of the study: results go to <storage>/<study-name>/ (letters, digits, . _ -)"
            return
    raise ValueError("set_study_name: the parser has no --study-name (call study.runner.add_common_args first)")


BAD_DATA_CHOICES = ("stop", "skip")


def add_bad_data_arg(ap: argparse.ArgumentParser) -> None:
    """``--bad-data stop|skip``: the study's policy for unusable subject files (sets every run's ``bad_data``)."""
    ap.add_argument("--bad-data", choices=BAD_DATA_CHOICES, default=None,
                    help="what the study does with an unusable subject file (truncated, corrupt, non-finite values): "
                         "'stop' stops launching trials at the first one and names it; 'skip' records it in the "
                         "study's quarantine list (<storage>/<study-name>/store/quarantine/) and every run skips its "
                         "windows (default: the runs' own setting, 'stop' unless the preset says otherwise)")
