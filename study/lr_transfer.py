"""A µTransfer result as a stored artifact that a ladder consumes (``--lr-from``).

``study/mutransfer.py`` writes ``<study>/report/lr_transfer.json`` after its analysis: the muP base width,
the base LR with its 95% interval (pooled over the widths of the sweep, where muP's optimum should not move),
the drift slope of the optimum against width with its interval, and the SP slope for contrast. A ladder
(``study/scaling_law.py --preset ladder --site SITE --lr-from <study dir | file | study name>``) reads it back,
trains every size under muP with that base width and base LR, and prints where the LR came from.

The artifact is plain JSON so it can be inspected, versioned and copied between sites; it holds no code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: file name of the artifact inside a µTransfer study's report folder
TRANSFER_FILE = "lr_transfer.json"


@dataclass(frozen=True, kw_only=True)
class TransferredLR:
    """The muP base LR a µTransfer study found, and how far to trust it."""

    family: str
    """Model family the sweep trained."""
    size: str
    """Named size whose width was varied (the ladder's sizes must differ from it in width only)."""
    base_width: int
    """muP base width: the LR is a base LR relative to base shapes at this width."""
    base_lr: float
    """Pooled optimum over the swept widths: ``2 ** mean(log2 LR*)``."""
    lr_lo: float
    lr_hi: float
    """95% interval of the base LR (t interval of the mean of ``log2 LR*`` over widths)."""
    widths: tuple
    """Widths of the sweep."""
    slope: float
    slope_lo: float
    slope_hi: float
    """Drift of ``log2 LR*`` per ``log2 width`` under muP and its 95% interval (0 inside = transfers)."""
    sp_slope: float | None = None
    """The same drift under SP, when the sweep had SP runs (for contrast)."""
    study: str = ""
    """Name of the µTransfer study."""
    warnings: tuple = ()
    """Reasons to doubt the result (optimum at the edge of the LR grid, interval spanning a wide range, ...)."""
    source: str = ""
    """File it was read from (filled on load)."""

    @property
    def transfers(self) -> bool:
        """muP's optimum does not drift: the slope's 95% interval contains 0."""
        return bool(self.slope_lo <= 0.0 <= self.slope_hi)

    def describe(self) -> str:
        """One line for a dry run: the LR, its interval and where it came from."""
        where = f"µTransfer study {self.study!r}" if self.study else "µTransfer result"
        if self.source:
            where += f" ({self.source})"
        line = (f"{self.base_lr:.3g} (95% {self.lr_lo:.3g}..{self.lr_hi:.3g}) at muP base width {self.base_width}, "
                f"from {where}: {self.family} {self.size}, widths {list(self.widths)}, muP drift "
                f"{self.slope:+.2f} [{self.slope_lo:+.2f}, {self.slope_hi:+.2f}] log2-LR per log2-width")
        if not self.transfers:
            line += "; WARNING: muP's optimum drifted in that study, so this LR may not transfer"
        return line

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["widths"], d["warnings"] = list(self.widths), list(self.warnings)
        d["transfers"] = self.transfers
        return d

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> "TransferredLR":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"family", "size", "base_width", "base_lr", "lr_lo", "lr_hi", "slope", "slope_lo",
                   "slope_hi", "widths"} - set(d)
        if missing:
            raise ValueError(f"{source or 'µTransfer result'}: missing fields {sorted(missing)}")
        kw = {k: v for k, v in d.items() if k in names and k != "source"}
        kw["widths"] = tuple(int(w) for w in kw["widths"])
        kw["warnings"] = tuple(kw.get("warnings", ()))
        kw["base_width"] = int(kw["base_width"])
        out = cls(**kw, source=source)
        if not (out.base_lr > 0 and math.isfinite(out.base_lr) and out.lr_lo <= out.base_lr <= out.lr_hi):
            raise ValueError(f"{source or 'µTransfer result'}: base_lr={out.base_lr!r} must be positive and "
                             f"inside its interval [{out.lr_lo!r}, {out.lr_hi!r}]")
        if out.base_width <= 0:
            raise ValueError(f"{source or 'µTransfer result'}: base_width={out.base_width} must be positive")
        return out

    @classmethod
    def load(cls, ref: str | Path, storage: str | Path | None = None) -> "TransferredLR":
        """Read the artifact from a file, a µTransfer study folder, or a study name under ``storage``.

        Raises ``ValueError`` naming every place it looked when none holds the artifact.
        """
        ref = Path(ref)
        tried = [ref, ref / "report" / TRANSFER_FILE, ref / TRANSFER_FILE]
        if storage is not None and not ref.is_absolute():
            tried.append(Path(storage) / ref / "report" / TRANSFER_FILE)
        for p in tried:
            if p.is_file():
                try:
                    data = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise ValueError(f"--lr-from {p}: not a readable µTransfer result ({exc})") from exc
                if not isinstance(data, dict):
                    raise ValueError(f"--lr-from {p}: expected a JSON object, got {type(data).__name__}")
                return cls.from_dict(data, source=str(p))
        raise ValueError(f"--lr-from {str(ref)!r}: no µTransfer result found; looked for "
                         f"{', '.join(str(p) for p in tried)} (run study/mutransfer.py first; it writes "
                         f"<storage>/<study>/report/{TRANSFER_FILE})")


def pooled_base_lr(log2_lr_opt, level: float = 0.95) -> tuple[float, float, float]:
    """``(lr, lo, hi)``: ``2 ** mean(log2 LR*)`` over widths with a t interval of the mean."""
    import numpy as np
    from scipy import stats

    x = np.asarray(log2_lr_opt, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        raise ValueError(f"pooling the optimal LR needs at least 2 widths with an optimum, got {len(x)}")
    m = float(x.mean())
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return 2.0 ** m, 2.0 ** (m - half), 2.0 ** (m + half)
