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


# --------------------------------------------------------------------------------------------------
# Ray: imported by the launch and sweep modules and the cluster layer's public API only
# --------------------------------------------------------------------------------------------------
RAY_PACKAGES = ("study", "data", "analysis", "neuro_models", "pbs")
RAY_ALLOWED = ("study/launch_*.py", "study/sweep*.py", "pbs/cluster.py")

#: files that import Ray outside RAY_ALLOWED, each with why and what removes it. A stale entry fails
#: ``test_known_ray_imports_still_exist``: delete it then, so the import cannot come back unnoticed.
KNOWN_RAY_IMPORTS: dict[str, str] = {}

#: files that import Ray's private modules (``ray._*``), each with why
KNOWN_PRIVATE_RAY: dict[str, str] = {
    "pbs/cluster.py": "ray._raylet.GcsClient to list the live nodes while the cluster forms, from a process that "
                      "is not a Ray driver; Ray 2.60 has no public API for that (ray.nodes() needs ray.init, "
                      "ray.util.state goes through the dashboard and builds the same GcsClient): see the file's top",
    "study/sweep.py": "release_orphaned_placement_groups reads the GCS placement-group table (ray._private.state); "
                      "Ray 2.60 has no public API that says which actor created a group",
}


def ray_modules(path: Path) -> set[str]:
    """The ``ray`` modules a file imports (function-level imports included)."""
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names if a.name.split(".")[0] == "ray"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "ray":
            mods |= {node.module} | {f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")}
    return mods


def _package_files() -> list[Path]:
    return sorted(p for pkg in RAY_PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _ray_allowed(rel: str) -> bool:
    return any(Path(rel).match(pattern) for pattern in RAY_ALLOWED)


def test_ray_only_in_launch_sweep_and_cluster_modules():
    offenders = sorted(_rel(p) for p in _package_files()
                       if ray_modules(p) and not _ray_allowed(_rel(p)) and _rel(p) not in KNOWN_RAY_IMPORTS)
    assert not offenders, (f"these files import ray; keep Ray in {RAY_ALLOWED} (study.sweep.connect_ray, "
                           f"study.launch_ray): {offenders}")


def test_no_private_ray_modules():
    offenders = sorted(_rel(p) for p in _package_files()
                       if any(part.startswith("_") for m in ray_modules(p) for part in m.split(".")[1:])
                       and _rel(p) not in KNOWN_PRIVATE_RAY)
    assert not offenders, f"these files import Ray's private modules (ray._*): {offenders}"


def test_known_ray_imports_still_exist():
    stale = [f"{rel} ({why})" for rel, why in {**KNOWN_RAY_IMPORTS, **KNOWN_PRIVATE_RAY}.items()
             if not (REPO / rel).exists() or not ray_modules(REPO / rel)]
    assert not stale, f"these files no longer import ray: remove them from the known lists: {stale}"


def test_ray_checker_sees_nested_and_private_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ray._raylet import GcsClient\n    import ray.train\n")
    assert {"ray._raylet", "ray.train"} <= ray_modules(f)
    assert _ray_allowed("study/launch_ray.py") and _ray_allowed("study/sweep.py")
    assert not _ray_allowed("study/runner.py") and not _ray_allowed("study/train.py")
