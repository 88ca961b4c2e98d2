"""Layering: models never import data/study/ray/wandb; the train path never imports Ray, W&B or analysis."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    """Top-level module names imported anywhere in a file (function-level imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted((REPO / "neuro_models").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_models_import_neither_data_nor_study_nor_ray(path):
    assert not imported_roots(path) & {"data", "study", "ray", "wandb", "analysis"}


TRAIN_PATH = ["study/train.py", "study/finetune_engine.py", "study/loop.py", "study/run_math.py", "study/checkpoint.py", "study/spec.py",
              "study/devices.py", "study/reporters.py", "study/metrics.py", "study/provenance.py", "study/trace.py"]


@pytest.mark.parametrize("rel", TRAIN_PATH)
def test_train_path_imports_no_ray_wandb_or_analysis(rel):
    assert not imported_roots(REPO / rel) & {"ray", "wandb", "analysis"}, rel


def test_checker_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.train\n    from wandb import init\n")
    assert {"ray", "wandb"} <= imported_roots(f)


PLANNING = ["study/run_math.py", "study/plans.py", "study/planner.py"]
LOOP_MODULES = {"study.train", "study.loop", "study.finetune_engine"}


def imported_modules(path: Path) -> set[str]:
    """Dotted module names imported anywhere in a file (``from pkg import name`` counts as ``pkg.name`` too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("rel", PLANNING)
def test_planning_imports_no_loop_code(rel):
    """Planning needs run arithmetic (study.run_math), never the step loop or an objective."""
    assert not imported_modules(REPO / rel) & LOOP_MODULES, rel


def test_finetune_objective_uses_the_shared_loop_not_pretraining():
    """Both objectives import the step machinery (study.loop); fine-tuning never imports the pre-training module."""
    assert "study.train" not in imported_modules(REPO / "study/finetune_engine.py")
    assert "study.loop" in imported_modules(REPO / "study/finetune_engine.py")
    assert "study.loop" in imported_modules(REPO / "study/train.py")
