"""Site profiles as data (study/sites.py) and the site-free ladder presets planned from them (study/plans.py)."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from study.plans import load_plan
from study.scaling_law import main
from study.sites import PROFILES_DIR, load_site, parse_profile, site_names

REPO = Path(__file__).resolve().parents[2]


def _bash_profile(name: str, extra: dict | None = None) -> dict[str, str]:
    """The PROFILE_* variables bash sets when it sources the profile (what pbs/ray_cluster.sh sees)."""
    code = (f"set -euo pipefail; source pbs/profiles/{name}.sh >/dev/null; "
            "for v in $(compgen -v PROFILE_); do printf '%s=%s\\n' \"$v\" \"${!v}\"; done")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "USER": "u", **(extra or {})}
    r = subprocess.run(["bash", "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


@pytest.mark.parametrize("name", site_names())
def test_the_parser_reads_what_bash_sets(name):
    """Every PROFILE_* variable bash sets, with the value bash gives it (values that bash expands, like
    PROFILE_STAGE_TO's ${USER}, are compared unexpanded: the study reads no such field)."""
    env = {"USER": "u"}
    parsed = parse_profile((PROFILES_DIR / f"{name}.sh").read_text(), env)
    bash = _bash_profile(name)
    assert set(parsed) == set(bash), name
    for k, v in parsed.items():
        if "$" not in v:
            assert bash[k] == v, (name, k)
    # a user's non-empty value wins, in bash and here alike
    user = {"PROFILE_DEVICES_PER_NODE": "2", "PROFILE_CPUS_PER_DEVICE": "3"}
    assert {k: _bash_profile(name, user)[k] for k in user} == user
    assert {k: parse_profile((PROFILES_DIR / f"{name}.sh").read_text(), user)[k] for k in user} == user


def test_sites_are_found_by_name_with_their_planning_data():
    assert {"aurora", "polaris", "frontier", "perlmutter", "generic"} <= set(site_names())
    got = {n: load_site(n, environ={}) for n in ("aurora", "polaris", "frontier", "perlmutter", "generic")}
    assert {n: (s.device_kind, s.devices_per_node, s.cpus_per_device) for n, s in got.items()} == {
        "aurora": ("max1550-tile", 12, 8), "polaris": ("a100-40gb", 4, 8), "frontier": ("mi250x-gcd", 8, 7),
        "perlmutter": ("a100-40gb", 4, 16), "generic": (None, None, None)}
    assert load_site("frontier", environ={"PROFILE_DEVICES_PER_NODE": "4"}).devices_per_node == 4
    assert load_site("frontier", environ={"PROFILE_DEVICES_PER_NODE": ""}).devices_per_node == 8  # bash's ':-'


@pytest.mark.parametrize("name", ["nosuchsite", "../polaris", ""])
def test_an_unknown_site_is_refused_naming_the_known_ones(name):
    with pytest.raises(ValueError, match="known: aurora, frontier, generic, perlmutter, polaris"):
        load_site(name)


def test_a_profile_line_the_parser_cannot_read_is_refused(tmp_path):
    (tmp_path / "odd.sh").write_text('PROFILE_DEVICE_KIND="${PROFILE_DEVICE_KIND:-a100-40gb}"\n'
                                     'PROFILE_DEVICES_PER_NODE=4\n')
    with pytest.raises(ValueError, match=r"odd.sh: line 2: .* is not of the form"):
        load_site("odd", environ={}, folder=tmp_path)
    (tmp_path / "bad.sh").write_text('PROFILE_DEVICES_PER_NODE="${PROFILE_DEVICES_PER_NODE:-four}"\n')
    with pytest.raises(ValueError, match="must be a positive whole number"):
        load_site("bad", environ={}, folder=tmp_path)


def _digest(plan, field: str) -> str:
    rows = [s.run_id if field == "run_id" else s.replace(study="x").to_json() for s in plan.specs]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def test_a_ladder_on_a_site_plans_what_the_site_named_preset_planned(tmp_path):
    """``ladder --site polaris`` and ``ladder-xl --site aurora`` are the former ``polaris`` and ``aurora`` presets:
    the same run ids and the same specs (digests taken from those presets before they were removed)."""
    opts = dict(manifest="m.parquet")
    small = load_plan("ladder", SimpleNamespace(site="polaris", **opts))
    assert (small.num_workers, small.device_kind, len(small.specs)) == (4, "a100-40gb", 27)
    assert (_digest(small, "run_id"), _digest(small, "spec")) == ("65da6d65105a1284", "8e49d5ef5f8838aa")
    xl = load_plan("ladder-xl", SimpleNamespace(site="aurora", **opts))
    assert (xl.num_workers, xl.device_kind, len(xl.specs)) == (12, "max1550-tile", 48)
    assert (_digest(xl, "run_id"), _digest(xl, "spec")) == ("349ebf794589ac79", "54f21fcd246dde19")


def test_the_site_sets_workers_kind_and_loader_cores_and_the_options_override_it(monkeypatch):
    monkeypatch.delenv("NEUROX_SITE", raising=False)
    for k in ("PROFILE_DEVICE_KIND", "PROFILE_DEVICES_PER_NODE", "PROFILE_CPUS_PER_DEVICE"):
        monkeypatch.delenv(k, raising=False)
    frontier = load_plan("ladder", SimpleNamespace(manifest="m.parquet", site="frontier"))
    assert (frontier.num_workers, frontier.device_kind) == (8, "mi250x-gcd")
    assert {p.workers for p in frontier.run_plans.values()} == {8}
    assert {s.num_workers for s in frontier.specs} == {5}  # 7 cores per GCD: 5 loader workers (planner rule)
    assert {s.batch_size for s in frontier.specs} == {64}  # 8 samples per device, as every ladder
    monkeypatch.setenv("NEUROX_SITE", "perlmutter")  # what pbs/ray_cluster.sh exports: the default site
    pm = load_plan("ladder", SimpleNamespace(manifest="m.parquet"))
    assert (pm.num_workers, pm.device_kind) == (4, "a100-40gb") and "site perlmutter" in pm.extra["hardware"]
    over = load_plan("ladder", SimpleNamespace(manifest="m.parquet", device_kind="h100-80gb", cpus_per_device=3))
    assert (over.num_workers, over.device_kind) == (4, "h100-80gb") and {s.num_workers for s in over.specs} == {1}
    monkeypatch.delenv("NEUROX_SITE")
    alone = load_plan("ladder", SimpleNamespace(manifest="m.parquet", device_kind="h100-80gb"))
    assert (alone.num_workers, alone.device_kind) == (4, "h100-80gb")  # no site: one 4-device node per run
    assert "does not count its devices" in alone.extra["hardware"]


def test_a_ladder_without_a_site_or_device_kind_and_the_old_names_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NEUROX_SITE", raising=False)
    m = tmp_path / "m.parquet"
    m.write_bytes(b"")
    assert main(["--preset", "ladder", "--manifest", str(m), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "pass --site NAME (aurora, frontier, generic, perlmutter, polaris) or --device-kind" in err
    assert main(["--preset", "ladder-xl", "--site", "generic", "--manifest", str(m), "--dry-run"]) == 2
    assert "site 'generic' names no device kind" in capsys.readouterr().err
    for old, new in (("polaris", "--preset ladder --site polaris"), ("aurora", "--preset ladder-xl --site aurora")):
        assert main(["--preset", old, "--manifest", str(m), "--site", old, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"preset '{old}' is now {new}" in err
    assert main(["--preset", "ladder", "--site", "nosuchsite", "--manifest", str(m), "--dry-run"]) == 2
    assert "site 'nosuchsite' (--site or $NEUROX_SITE) is not a profile" in capsys.readouterr().err


def test_the_dry_run_prints_each_run_planned_for_the_sites_device_kind(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NEUROX_SITE", raising=False)
    m = tmp_path / "m.parquet"
    m.write_bytes(b"")
    assert main(["--preset", "ladder", "--site", "frontier", "--manifest", str(m), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "27 runs, 8 worker(s)/run, mi250x-gcd" in out and "planned for site frontier: 8 x mi250x-gcd per run" in out
    rows = [line for line in out.splitlines() if line.startswith("swift_v2-")]
    assert len(rows) == 27 and all(line.split()[14].endswith("/64") for line in rows)  # GiB of an MI250X GCD
    assert "GPU-hours on mi250x-gcd" in out
