"""Budgeted benchmark sections (shared by the NeuroMamba benchmarks): each section runs only when asked for and
when enough of the call's time budget is left; one that fails is recorded with its traceback and the others still
run; results are saved after every section, so a call killed at its limit keeps what it measured."""
from __future__ import annotations

import time
import traceback
from typing import Any, Callable


class Sections:
    """``Sections(res, wanted="a,b", budget_s=..., save=..., device=...)``; then ``run("a", fn, need_s)``."""

    def __init__(self, res: dict[str, Any], *, wanted: str, budget_s: float, save: Callable[[], None], device=None,
                 t_start: float | None = None) -> None:
        self.res, self.wanted, self.budget_s, self.save, self.device = res, wanted.split(","), budget_s, save, device
        self.t_start = time.perf_counter() if t_start is None else t_start
        res.setdefault("sections", {})
        res.setdefault("errors", {})

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - (time.perf_counter() - self.t_start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def run(self, name: str, fn: Callable[[], Any], need_s: float = 30.0) -> None:
        if name not in self.wanted:
            return
        if self.left() < need_s:
            self.res["errors"][name] = f"skipped: {self.left():.0f} s of budget left, {need_s:.0f} s needed"
            self.save()
            return
        t0 = time.perf_counter()
        try:
            self.res["sections"][name] = fn()
        except Exception as e:  # keep going: one failed section must not lose the others
            self.res["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        self.res.setdefault("section_s", {})[name] = time.perf_counter() - t0
        if self.device is not None and getattr(self.device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()
        self.save()
        print(f"[{self.elapsed():6.1f}s] {name} done", flush=True)
