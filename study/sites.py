"""Site profiles as data: the hardware a ladder preset is planned for, read from ``pbs/profiles/<site>.sh``.

A site is one file in ``pbs/profiles/`` (pbs/README.md, "Adding a site"). The cluster bootstrap sources it in bash;
the study reads the same file as data: every line ``PROFILE_X="${PROFILE_X:-value}"`` gives ``PROFILE_X`` the value
``value``, unless the environment sets ``PROFILE_X`` to a non-empty value (bash's ``:-`` rule, so a user's value wins
here as it does in the job). Nothing is executed; the values are not expanded (``PROFILE_STAGE_TO`` may hold
``${USER}``: the fields read here are plain words and numbers).

A study plans one run per node (:mod:`study.plans`, ladder presets): ``PROFILE_DEVICES_PER_NODE`` workers of kind
``PROFILE_DEVICE_KIND`` (``study/device_kinds.json``), each given ``PROFILE_CPUS_PER_DEVICE`` CPU cores.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

PROFILES_DIR = Path(__file__).resolve().parent.parent / "pbs" / "profiles"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # the rule of pbs/ray_cluster.sh --profile
_LINE = re.compile(r'^(PROFILE_[A-Z0-9_]+)="\$\{\1:-(.*)\}"\s*(?:#.*)?$')


@dataclass(frozen=True)
class Site:
    """The planning data of one site profile (empty fields: the profile leaves them to Ray or the user)."""

    name: str
    scheduler: str
    device_kind: str | None
    devices_per_node: int | None
    cpus_per_device: int | None
    preset: str


def site_names(folder: Path = PROFILES_DIR) -> list[str]:
    """The sites, discovered from their folder (one file each)."""
    return sorted(p.stem for p in folder.glob("*.sh") if NAME_RE.match(p.stem))


def parse_profile(text: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``PROFILE_*`` name -> value of a profile's data lines, a non-empty ``environ`` value winning (bash ``:-``).

    A ``PROFILE_*`` assignment in any other form is refused: it would mean something to bash that the study
    cannot see."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s.startswith("PROFILE_"):
            continue
        m = _LINE.match(s)
        if not m:
            raise ValueError(f"line {n}: {s!r} is not of the form PROFILE_X=\"${{PROFILE_X:-value}}\"")
        out[m.group(1)] = env.get(m.group(1)) or m.group(2)
    return out


def _int(data: dict[str, str], key: str, where: str) -> int | None:
    v = data.get(key, "")
    if v == "":
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{where}: {key}={v!r} must be a positive whole number or empty")
    return int(v)


def load_site(name: str, environ: Mapping[str, str] | None = None, folder: Path = PROFILES_DIR) -> Site:
    """The site profile ``<folder>/<name>.sh`` as data; ValueError naming the known sites for an unknown one."""
    path = folder / f"{name}.sh"
    if not NAME_RE.match(name or "") or not path.is_file():
        raise ValueError(f"site {name!r} (--site or $NEUROX_SITE) is not a profile pbs/profiles/NAME.sh; known: "
                         f"{', '.join(site_names(folder))} (a new site is one file there: pbs/README.md)")
    where = f"pbs/profiles/{name}.sh"
    try:
        data = parse_profile(path.read_text(), environ)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return Site(name=name, scheduler=data.get("PROFILE_SCHEDULER", ""),
                device_kind=data.get("PROFILE_DEVICE_KIND") or None,
                devices_per_node=_int(data, "PROFILE_DEVICES_PER_NODE", where),
                cpus_per_device=_int(data, "PROFILE_CPUS_PER_DEVICE", where),
                preset=data.get("PROFILE_PRESET", ""))
