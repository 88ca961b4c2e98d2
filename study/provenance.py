"""Provenance recorded with every result row: code commit, key package versions, data manifest hash."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

KEY_PACKAGES = ("torch", "ray", "deepspeed", "mup", "numpy", "h5py", "neurox")
_REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def code_commit() -> str:
    """Git commit of the code (``+dirty`` when the tracked tree has changes), or a hash of the sources.

    Under ``ray job submit --working-dir`` the code runs from a copy without ``.git``; then the commit
    comes from ``$NEUROX_CODE_COMMIT`` (the launcher sets it) or a content hash of the Python sources.
    """
    if os.environ.get("NEUROX_CODE_COMMIT"):
        return os.environ["NEUROX_CODE_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(_REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(_REPO_ROOT), "status", "--porcelain", "-uno", "--",
                                    "study", "neuro_models", "data", "analysis"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "src-" + source_hash()


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    h = hashlib.sha256()
    for pkg in ("study", "neuro_models", "data", "analysis"):
        for f in sorted((_REPO_ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(_REPO_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def package_versions() -> str:
    out = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return json.dumps(out, sort_keys=True)


@functools.lru_cache(maxsize=64)
def manifest_content_hash(manifest_path: str) -> str | None:
    if not manifest_path:
        return None
    from data.manifest import Manifest

    return Manifest.load(manifest_path).content_hash


def provenance(manifest_path: str, manifest_hash: str | None = None) -> dict[str, str | None]:
    return {"code_commit": code_commit(), "package_versions": package_versions(),
            "data_manifest_hash": manifest_hash if manifest_hash is not None
            else manifest_content_hash(manifest_path)}
