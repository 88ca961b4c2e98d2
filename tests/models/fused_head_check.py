"""Checks of the fused SimMIM head, run in a subprocess by test_swift_fused_head.py with TRITON_INTERPRET=1 (the
variable must be set before Triton decorates the kernel, so not inside the shared pytest process)."""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from interpreted import rel  # this folder

from neuro_models import registry as R
from neuro_models.swift.kernels import fused_head
from neuro_models.swift.model import reconstruction_loss


def kernel_matches_reference() -> None:
    """Loss and gradients of the kernel (float32) against the PyTorch reference in float64, with the patch elements
    split over several programs (atomic hidden gradient) and in one (stored)."""
    configs = fused_head.CONFIGS
    for first in (configs[0], max(configs, key=lambda c: c["P_CHUNK"])):
        fused_head.CONFIGS = [first]  # on CPU the first configuration runs
        _kernel_cases()
    fused_head.CONFIGS = configs


def _kernel_cases() -> None:
    torch.manual_seed(0)
    for C, patch, T, loss_type, brain in [(1, (6, 6, 6, 1), 6, "l1", True), (2, (6, 6, 6, 2), 8, "huber", False),
                                         (1, (6, 6, 6, 1), 5, "l2", True), (1, (4, 6, 2, 2), 6, "l1", False)]:
        px, py, pz, pt = patch
        B, X, Y, Z = 2, 12, 18, 12
        grid = (X // px, Y // py, Z // pz, T // pt)
        P = C * px * py * pz * pt
        h = torch.randn(B, *grid, 16, dtype=torch.float64, requires_grad=True)
        W = (0.3 * torch.randn(P, 16, dtype=torch.float64)).requires_grad_()
        b = (0.1 * torch.randn(P, dtype=torch.float64)).requires_grad_()
        x = torch.randn(B, C, X, Y, Z, T, dtype=torch.float64)
        mask = torch.rand(B, *grid) < 0.6
        bm = (torch.rand(B, X, Y, Z) < 0.7) if brain else None
        cfg = types.SimpleNamespace(patch_size=patch, in_chans=C, loss_type=loss_type, huber_delta=0.5,
                                    brain_only_loss=True)
        ref = reconstruction_loss(cfg, F.linear(F.gelu(h), W, b), x, mask, bm)
        g_ref = torch.autograd.grad(ref, [h, W, b])
        leaves = [t.detach().float().requires_grad_() for t in (h, W, b)]
        out = fused_head.fused_head_loss(*leaves, x.float(), mask, bm, patch, loss_type, 0.5)
        g = torch.autograd.grad(2.5 * out, leaves)  # a non-unit upstream gradient scales every gradient
        assert abs(float(out) - float(ref)) <= 1e-6 * abs(float(ref)), (patch, loss_type, float(out), float(ref))
        for name, a, r in zip("hWb", g, g_ref):
            assert rel(a, 2.5 * r) < 1e-5, (patch, loss_type, name, rel(a, 2.5 * r))


def model_matches_pytorch_path() -> None:
    """SimMIM with the fused head equals the PyTorch head (dense and token-selected) in loss and every gradient."""
    cfg = R.get_config("swift_v2", "debug", img_size=(24, 36, 48, 6), decoder_dim=16, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = R.build_pretrain_model(cfg)
    x = torch.randn(2, 1, *cfg.img_size)
    mask = model.make_mask(2, generator=torch.Generator().manual_seed(0))
    brain = torch.rand(2, *cfg.img_size[:3]) < 0.8
    assert model.uses_fused_head(x)
    runs = {}
    for name, fused, exact in (("fused", True, True), ("dense", False, False), ("select", False, True)):
        model.cfg = cfg.replace(fused_head=fused)
        model.zero_grad(set_to_none=True)
        out = model(x, brain_mask=brain, mask=mask, exact_mask=exact)
        out["loss"].backward()
        runs[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    model.cfg = cfg
    fused_out = runs["fused"][0]
    assert fused_out["pred"] is None and fused_out["hidden"] is not None
    dense_pred = runs["dense"][0]["pred"]
    assert rel(model.full_prediction(fused_out), dense_pred) < 1e-5
    for other in ("dense", "select"):
        assert abs(float(fused_out["loss"]) - float(runs[other][0]["loss"])) < 1e-5, other
        for n, g in runs[other][1].items():
            assert rel(runs["fused"][1][n], g) < 1e-4, (other, n, rel(runs["fused"][1][n], g))
    # a decoder width the kernel does not take: the PyTorch path
    small = R.build_pretrain_model(cfg.replace(decoder_dim=8))
    assert not small.uses_fused_head(x) and small(x, mask=mask)["pred"] is not None
    # a ZeRO-3 partitioned weight (DeepSpeed sets ds_id): gathered only in its module's forward, so PyTorch path
    model.decoder.out.weight.ds_id = 7
    assert not model.uses_fused_head(x) and model(x, mask=mask)["pred"] is not None


if __name__ == "__main__":
    assert fused_head.available(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    {"kernel": kernel_matches_reference, "model": model_matches_pytorch_path}[sys.argv[1]]()
    print("ok")
