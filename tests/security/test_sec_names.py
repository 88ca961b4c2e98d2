"""Names that become paths (issue #30 item 5): study names, spec fields, run ids; storage confinement.

Before the fix, ``RunSpec(study="a/../../b", family="../../..")`` was accepted (its run id contained
``../``), ``--study-name ../../x`` was used as is, and ``study_guard`` wrote ``study.json`` wherever the
name (or a symlink inside the storage) pointed.
"""
from __future__ import annotations

import argparse
import json
import os

import pytest

from study.runner import confined, run_plan, study_guard
from study.spec import RunSpec

FP = {"source_hash": "a", "data_manifest_hash": "b"}


@pytest.mark.parametrize("field, value", [("study", "a/../../b"), ("study", "../x"), ("study", ".hidden"),
                                          ("study", "-rf"), ("study", ""), ("family", "../../.."),
                                          ("size", "debug/../../x"), ("study", "a b"), ("size", "..")])
def test_path_like_names_are_refused_naming_field_and_rule(field, value):
    with pytest.raises(ValueError) as e:
        RunSpec(**{field: value})
    assert f"{field}={value!r}" in str(e.value) and "^[A-Za-z0-9][A-Za-z0-9._-]*$" in str(e.value)


def test_family_and_size_must_be_registry_entries_and_run_ids_are_plain_names():
    with pytest.raises(ValueError, match=r"family='nope' is not allowed; choose one of \['neuromamba'"):
        RunSpec(family="nope")
    with pytest.raises(ValueError, match="size='7B' is not a size of family 'swift_v2'"):
        RunSpec(size="7B")
    spec = RunSpec(family="neuromamba", size="3.1M", study="ladder-v1.2_b")
    assert "/" not in spec.run_id and spec.run_id == RunSpec.from_json(spec.to_json()).run_id


def test_study_guard_never_writes_outside_the_storage(tmp_path):
    storage = tmp_path / "storage"
    outside = tmp_path / "outside"
    storage.mkdir()
    outside.mkdir()
    with pytest.raises(ValueError, match="study name='../outside'"):
        study_guard(storage / "../outside", FP, "refuse", "../outside", storage)
    # a symlink inside the (shared) storage pointing at someone else's folder
    (storage / "evil").symlink_to(outside)
    with pytest.raises(ValueError, match="outside --storage"):
        study_guard(storage / "evil", FP, "refuse", "evil", storage)
    assert list(outside.iterdir()) == []
    # a versioned study name goes through the same check
    name, d = study_guard(storage / "ok", FP, "refuse", "ok", storage)
    (storage / "ok-v2").symlink_to(outside)
    with pytest.raises(ValueError, match="outside --storage"):
        study_guard(storage / "ok", {**FP, "source_hash": "c"}, "new-version", "ok", storage)
    assert list(outside.iterdir()) == [] and json.loads((d / "study.json").read_text()) == FP
    assert confined(storage, "ok") == (storage / "ok").resolve()


def test_run_plan_refuses_a_bad_study_name_before_writing(tmp_path):
    class Plan:
        name, cohort, specs = "demo", None, []

    args = argparse.Namespace(study_name="../../x", storage=str(tmp_path / "storage"), manifest=None)
    with pytest.raises(ValueError, match="--study-name='../../x' is not a valid name"):
        run_plan(Plan(), args, repo_root=tmp_path)
    assert os.listdir(tmp_path) == []
