"""Run a check script of this folder in a subprocess under the Triton interpreter (``TRITON_INTERPRET=1`` must be
set before Triton decorates a kernel, so not inside the shared pytest process), and what those scripts share."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_check(script: str, case: str) -> None:
    """``python <this folder>/<script> <case>`` with the interpreter on; it must exit 0 and print ``ok`` last."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), case], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


def fp16_loss_and_grads(cfg) -> tuple[float, torch.Tensor]:
    """One SimMIM training step of ``build_pretrain_model(cfg)`` (seed 0, batch 2, fp16 autocast on CPU): the loss and
    every parameter gradient, flattened (the check scripts compare a kernel against the PyTorch path with it)."""
    from neuro_models import registry as R

    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    x = torch.randn(2, 1, *cfg.img_size)
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x, mask=mask)["loss"]
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def fp16_module_step(mod: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward of ``mod`` on ``x`` under fp16 autocast (CPU) and backward of ``sum(y^2)``: ``[y, dx, *param grads]``
    (the check scripts compare a Triton module with the PyTorch one, eager and compiled, with it)."""
    for p in mod.parameters():
        p.grad = None
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = mod(xi)
    y.float().square().sum().backward()
    return [y.float(), xi.grad] + [p.grad for p in mod.parameters()]
