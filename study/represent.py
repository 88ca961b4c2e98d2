"""Representation analyses of pre-trained (or freshly built) encoders: the seed report's Figure 5 (issue #27 item 4).

Four commands, each writing ``<storage>/<study-name>/<command>.png`` and ``<command>.json``::

    # A: temporal autocorrelation of every stage's token embeddings against the input fMRI's
    python -m study.represent autocorr --model swift_v2:debug swift_v2_revised:debug
    # B: masked-frame reconstructions (SimMIM): input, mask, reconstruction for a few slices
    python -m study.represent recon --model runs/finetune/pretrained/<run_id>.safetensors
    # C: memory against sequence length, original vs revised SwiFT (planner's model; --measure adds CPU counts)
    python -m study.represent memory --size 51M --lengths 20 40 60 80 100 --measure
    # CKA between models' (sizes', widths') pooled per-stage representations of the same windows
    python -m study.represent cka --model swift_v2:debug@16 swift_v2:debug@32 swift_v2_revised:debug

A model is ``family:size[@width]`` (random init, seeded: "what the architecture alone does") or an exported weights
file (``study.checkpoint.export_weights``; ``study.finetune`` writes one per study under ``<study>/pretrained/``),
whose stored spec fixes the architecture, grid and sequence length. Weights are read with
:func:`study.checkpoint.load_exported` and checked against the config with
:func:`study.finetune_engine.check_compatible`, as fine-tuning does. Windows come from ``--manifest`` (default: a
small synthetic cohort generated under the study folder, as ``study.finetune --quick`` does). The math is in
:mod:`analysis.representation`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

COMMANDS = ("autocorr", "recon", "memory", "cka")


# --------------------------------------------------------------------------------------------------
# models and windows
# --------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    label: str
    cfg: Any
    model: Any  # the pre-training model (``.encoder`` + decoder), eval mode
    spec: Any
    weights: str | None


def load_model(ref: str, *, grid: Sequence[int], sequence_length: int, manifest: str = "", seed: int = 0
               ) -> LoadedModel:
    """A pre-training model from ``family:size[@width]`` (random init under ``seed``) or an exported weights file.

    With weights, the file's stored spec sets the architecture (its grid and sequence length win over the
    arguments); the config is checked against the file's stored config before loading (``CheckpointError``)."""
    import torch

    from neuro_models import registry as R
    from study import checkpoint as ckpt
    from study.finetune_engine import check_compatible
    from study.run_math import model_config
    from study.spec import RunSpec

    if ref.endswith(".safetensors") or Path(ref).is_file():
        sd, info = ckpt.load_exported(ref)
        spec = RunSpec.from_dict(info["spec"]).replace(manifest=manifest or info["spec"].get("manifest", ""))
        cfg = model_config(spec)
        check_compatible(cfg, info, ref)
        torch.manual_seed(seed)
        model = R.build_pretrain_model(cfg)
        model.load_state_dict(sd, strict=True)
        tag = Path(ref).stem.rsplit("-", 1)[-1]  # the run id's hash
        label = f"{spec.family}:{spec.size}" + (f"@{spec.width}" if spec.width else "") + f" [{tag}]"
        weights: str | None = str(ref)
    else:
        fam, _, rest = ref.partition(":")
        size, _, width = (rest or "debug").partition("@")
        spec = RunSpec(family=fam, size=size, width=int(width) if width else None, grid=tuple(grid),
                       sequence_length=int(sequence_length), manifest=manifest, precision="fp32")
        cfg = model_config(spec)
        torch.manual_seed(seed)
        model = R.build_pretrain_model(cfg)
        label = f"{fam}:{size}" + (f"@{width}" if width else "") + " (random init)"
        weights = None
    return LoadedModel(label, cfg, model.eval(), spec, weights)


def load_windows(manifest: str, *, grid: Sequence[int], sequence_length: int, n_windows: int, split: str = "train"):
    """``(x [N, 1, X, Y, Z, T], brain_mask [N, X, Y, Z], tr)``: ``n_windows`` windows spread evenly over the split."""
    import torch

    from data.datasets import WindowedDataset
    from data.manifest import Manifest

    ds = WindowedDataset(Manifest.load(manifest), split=split, sequence_length=int(sequence_length),
                         grid=tuple(grid), stride_between=1.0)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {manifest} has no windows of {sequence_length} frames")
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n_windows, len(ds))).round().astype(int))
    items = [ds[int(i)] for i in idx]
    x = torch.stack([it["x"] for it in items]).float()
    bm = torch.stack([it["brain_mask"] for it in items])
    return x, bm, float(items[0]["tr"])


def stage_embeddings(encoder, x_BCXYZT, family: str | None = None) -> list[np.ndarray]:
    """Token embeddings ``[B, X', Y', Z', T', D]`` after every stage of ``encoder`` (forward hooks on the family's
    ``stage_modules``; ``family`` defaults to the encoder's ``cfg.family``; a family without stages gives the
    encoder's output alone). The last entry is the final, normed output."""
    import torch

    from neuro_models import registry as R

    outs: list = []
    stages = list(R.get_family(family or encoder.cfg.family).stage_modules(encoder))
    hooks = [s.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for s in stages]
    try:
        with torch.no_grad():
            final = encoder(x_BCXYZT)
    finally:
        for h in hooks:
            h.remove()
    if stages:
        outs[-1] = final.detach()  # the last stage's output after the encoder's final norm
    else:
        outs = [final.detach()]
    return [o.double().numpy() for o in outs]


def _tokens_over_time(e_BXYZTD: np.ndarray) -> np.ndarray:
    """``[B, X, Y, Z, T, D] -> [B*X*Y*Z, T, D]`` (one series per token position; a sequence output ``[B, N, D]``
    has no time axis: ``ValueError``)."""
    if e_BXYZTD.ndim != 6:
        raise ValueError(f"embeddings of shape {e_BXYZTD.shape} have no (X, Y, Z, T) token grid")
    B, X, Y, Z, T, D = e_BXYZTD.shape
    return e_BXYZTD.reshape(B * X * Y * Z, T, D)


# --------------------------------------------------------------------------------------------------
# the four analyses (each returns a JSON-able dict)
# --------------------------------------------------------------------------------------------------
def run_autocorr(models: Sequence[LoadedModel], x, brain_mask, *, tr: float, max_lag: int | None = None) -> dict:
    """Mean autocorrelation curves over frames: the input's (brain voxels) and every model's every stage."""
    from analysis.representation import autocorrelation, decorrelation_lag

    xv = x[:, 0].permute(0, 4, 1, 2, 3).double().numpy()  # [B, T, X, Y, Z]
    B, T = xv.shape[:2]
    vox = np.stack([xv[b][:, brain_mask[b].numpy()] for b in range(B)])  # [B, T, V]
    lag = T - 1 if max_lag is None else min(int(max_lag), T - 1)
    curves = {"input": autocorrelation(vox, lag)}
    for m in models:
        for s, e in enumerate(stage_embeddings(m.model.encoder, x)):
            curves[f"{m.label} / stage {s}"] = autocorrelation(_tokens_over_time(e), lag)
    return {"tr_s": tr, "lags_frames": list(range(lag + 1)),
            "curves": {k: v.tolist() for k, v in curves.items()},
            "decorrelation_lag_frames": {k: decorrelation_lag(v) for k, v in curves.items()},
            "n_windows": int(B)}


def unpatchify(p_BXYZTP, patch_size: Sequence[int], in_chans: int):
    """``[B, X', Y', Z', T', C*px*py*pz*pt] -> [B, C, X, Y, Z, T]`` (patch vectors in (C, px, py, pz, pt) order, the
    layout of the SwiFT decoders' predictions)."""
    B, X, Y, Z, T, _ = p_BXYZTP.shape
    px, py, pz, pt = patch_size
    v = p_BXYZTP.reshape(B, X, Y, Z, T, in_chans, px, py, pz, pt).permute(0, 5, 1, 6, 2, 7, 3, 8, 4, 9)
    return v.reshape(B, in_chans, X * px, Y * py, Z * pz, T * pt)


def run_recon(m: LoadedModel, x, brain_mask, *, seed: int = 0) -> dict:
    """One masked forward pass: input, token mask (upsampled to voxels), reconstruction and the masked-voxel error
    (MSE over masked brain voxels, with the error of predicting 0 -- the z-scored mean -- beside it)."""
    import torch

    from neuro_models import registry as R

    mask_fn = R.mask_function(m.cfg)
    if mask_fn is None:
        raise ValueError(f"{m.label}: family {m.cfg.family!r} has no masked-modeling objective to reconstruct with")
    g = torch.Generator().manual_seed(seed)
    mask = mask_fn(x.shape[0], generator=g)
    with torch.no_grad():
        out = m.model(x, brain_mask=brain_mask, mask=mask)
    pred = out.get("pred")
    if pred is None:
        pred = m.model.full_prediction(out)
    recon = unpatchify(pred.float(), m.cfg.patch_size, m.cfg.in_chans)
    vmask = mask[:, None].float()
    for ax, p in zip((2, 3, 4, 5), m.cfg.patch_size):
        vmask = vmask.repeat_interleave(p, dim=ax)
    sel = vmask[:, 0].bool() & brain_mask[..., None].bool()
    err = float(((recon[:, 0] - x[:, 0]) ** 2)[sel].mean())
    base = float((x[:, 0] ** 2)[sel].mean())
    return {"label": m.label, "loss": float(out["loss"]), "masked_mse": err, "masked_mse_predict_zero": base,
            "mask_ratio": float(mask.float().mean()), "x": x[:, 0].numpy(), "mask": vmask[:, 0].numpy(),
            "recon": recon[:, 0].numpy(), "brain_mask": brain_mask.numpy()}


def run_memory(*, families: Sequence[str], size: str, lengths: Sequence[int], grid: Sequence[int], micro_batch: int,
               checkpointing: bool, measure: bool, measure_size: str = "debug", measure_grid: Sequence[int] = (24, 24,
                                                                                                           24)) -> dict:
    """Predicted peak GiB per device (``study.planner.memory_gib``, one GPU, no ZeRO) per family and sequence length;
    a length a family's windows cannot tile is recorded as ``null`` with the reason. ``measure``: also the bytes of
    the tensors autograd saves for the backward in one forward + loss on CPU (``measure_size`` at
    ``measure_grid``), the activation memory of that size measured rather than modelled."""
    from study.planner import memory_gib
    from study.spec import RunSpec

    out: dict = {"size": size, "grid": list(grid), "micro_batch": micro_batch, "checkpointing": checkpointing,
                 "lengths": list(lengths), "predicted_gib": {}, "invalid": {}}
    for fam in families:
        vals = []
        for T in lengths:
            try:
                r = memory_gib(RunSpec(family=fam, size=size, grid=tuple(grid), sequence_length=int(T)), world=1,
                               micro_batch=micro_batch, zero_stage=0, checkpointing=checkpointing, compiled=False)
                vals.append(r["total"])
            except ValueError as exc:
                vals.append(None)
                out["invalid"].setdefault(fam, {})[str(T)] = str(exc)
        out["predicted_gib"][fam] = vals
    if measure:
        out["measured"] = {"size": measure_size, "grid": list(measure_grid), "saved_mib": {}}
        for fam in families:
            vals = []
            for T in lengths:
                try:
                    vals.append(saved_activation_bytes(fam, measure_size, measure_grid, int(T), micro_batch) / 2**20)
                except ValueError:
                    vals.append(None)
            out["measured"]["saved_mib"][fam] = vals
    return out


def saved_activation_bytes(family: str, size: str, grid: Sequence[int], T: int, batch: int, seed: int = 0) -> int:
    """Bytes of the distinct tensors autograd saves for the backward during one pre-training forward (+ loss) on
    CPU: the activation memory a training step holds at its peak, measured."""
    import torch

    m = load_model(f"{family}:{size}", grid=grid, sequence_length=T, seed=seed).model.train()
    x = torch.randn(batch, m.cfg.in_chans, *m.cfg.img_size)
    seen: dict = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = key[1]
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(x)["loss"]
    del loss
    return int(sum(seen.values()))


def run_cka(models: Sequence[LoadedModel], x, *, debiased: bool) -> dict:
    """Linear CKA between every (model, stage) pair's mean-pooled window representations ``[N windows, D]``."""
    from analysis.representation import cka_matrix

    labels, reps = [], []
    for m in models:
        for s, e in enumerate(stage_embeddings(m.model.encoder, x)):
            labels.append(f"{m.label} / stage {s}")
            reps.append(e.reshape(e.shape[0], -1, e.shape[-1]).mean(1))
    M = cka_matrix(reps, debiased=debiased)
    return {"labels": labels, "cka": M.tolist(), "debiased": debiased, "n_windows": int(x.shape[0]),
            "estimator": "unbiased HSIC (Song et al. 2012)" if debiased else "biased HSIC (Kornblith et al. 2019)"}


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_autocorr(res: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lags = np.asarray(res["lags_frames"]) * res["tr_s"]
    for k, v in res["curves"].items():
        style = dict(color="k", lw=2.5) if k == "input" else dict(lw=1.5, marker="o", ms=3)
        ax.plot(lags, v, label=f"{k} (1/e at {res['decorrelation_lag_frames'][k]:.2f} frames)", **style)
    ax.axhline(math.exp(-1), color="grey", ls=":", lw=1)
    ax.set_xlabel(f"lag (s; TR = {res['tr_s']:g} s)")
    ax.set_ylabel("mean autocorrelation (unitless)")
    ax.set_title("Temporal autocorrelation: embeddings vs input fMRI")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recon(res: dict, path: Path, n_samples: int = 2) -> None:
    plt = _plt()
    x, mask, rec, bm = res["x"], res["mask"], res["recon"], res["brain_mask"]
    n = min(n_samples, x.shape[0])
    T = x.shape[-1]
    fig, axes = plt.subplots(n, 4, figsize=(11, 2.9 * n), squeeze=False)
    for i in range(n):
        z = x.shape[3] // 2
        frac = mask[i, :, :, z].mean((0, 1))  # masked fraction of the slice per frame
        t = int(np.argmin(np.abs(frac - 0.5)))  # a frame with masked and visible parts on the slice
        lim = float(np.abs(x[i][bm[i]]).max()) or 1.0
        brain = bm[i, :, :, z]
        m_ = mask[i, :, :, z, t] > 0
        panels = [(np.where(brain, x[i, :, :, z, t], np.nan), "input"),
                  (m_.astype(float), "mask (white = masked)"),
                  (np.where(brain, np.where(m_, rec[i, :, :, z, t], x[i, :, :, z, t]), np.nan),
                   "visible input + reconstruction"),
                  (np.where(brain, rec[i, :, :, z, t], np.nan), "reconstruction")]
        for j, (ax, (img, title)) in enumerate(zip(axes[i], panels)):
            kw = dict(cmap="gray", vmin=0, vmax=1) if j == 1 else dict(cmap="RdBu_r", vmin=-lim, vmax=lim)
            im = ax.imshow(img.T, origin="lower", **kw)
            if j != 1:
                shown = im
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("x (voxels)")
            if j == 0:
                ax.set_ylabel(f"window {i}, z={z}, frame {t}\ny (voxels)", fontsize=8)
        fig.colorbar(shown, ax=axes[i].tolist(), label="signal (z-score)", shrink=0.8)
    fig.suptitle(f"{res['label']}: masked-voxel MSE {res['masked_mse']:.3f} (predicting 0: "
                 f"{res['masked_mse_predict_zero']:.3f})", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(res: dict, path: Path) -> None:
    plt = _plt()
    measured = res.get("measured")
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(11 if measured else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for fam, vals in res["predicted_gib"].items():
        pts = [(T, v) for T, v in zip(res["lengths"], vals) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=fam)
    ax.set_xlabel("sequence length (frames)")
    ax.set_ylabel("predicted peak memory per GPU (GiB)")
    ax.set_title(f"{res['size']} at {'x'.join(map(str, res['grid']))}, micro-batch {res['micro_batch']} "
                 f"(planner model)", fontsize=9)
    ax.legend()
    if measured:
        ax = axes[0][1]
        for fam, vals in measured["saved_mib"].items():
            pts = [(T, v) for T, v in zip(res["lengths"], vals) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="s", label=fam)
        ax.set_xlabel("sequence length (frames)")
        ax.set_ylabel("activations saved for backward (MiB)")
        ax.set_title(f"measured on CPU: {measured['size']} at {'x'.join(map(str, measured['grid']))}", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cka(res: dict, path: Path) -> None:
    plt = _plt()
    M = np.asarray(res["cka"])
    n = len(res["labels"])
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * n, 2 + 0.6 * n))
    im = ax.imshow(M, vmin=min(0.0, float(M.min())), vmax=1, cmap="viridis")
    ax.set_xticks(range(n), res["labels"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), res["labels"], fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if M[i, j] < 0.6 else "k")
    ax.set_xlabel("representation (model / stage, mean-pooled)")
    ax.set_ylabel("representation (model / stage, mean-pooled)")
    fig.colorbar(im, ax=ax, label=f"linear CKA ({'debiased' if res['debiased'] else 'biased'}, unitless)")
    ax.set_title(f"CKA over {res['n_windows']} windows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from study.cli_args import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m study.represent", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def common(p: argparse.ArgumentParser, data: bool = True) -> None:
        p.add_argument("--storage", default="studies", help="directory for everything durable")
        p.add_argument("--study-name", default="represent",
                       help="name of the study: results go to <storage>/<study-name>/ (letters, digits, . _ -)")
        p.add_argument("--seed", type=int, default=0, help="seed of random-init models and masks")
        if not data:
            return
        p.add_argument("--manifest", default=None,
                       help="cohort manifest (Parquet); default: a 12-subject synthetic cohort (24^3, 16 frames) "
                            "generated under <storage>/<study-name>/cohort")
        p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split the windows come from")
        p.add_argument("--grid", type=int, nargs=3, default=[24, 24, 24],
                       help="input grid of random-init models (weights files use their own)")
        p.add_argument("--sequence-length", type=int, default=8,
                       help="frames per window of random-init models (weights files use their own)")
        p.add_argument("--n-windows", type=int, default=8, help="windows to analyse, spread over the split")

    p = sub.add_parser("autocorr", help="embedding autocorrelation vs the input's (Figure 5A)",
                       formatter_class=HelpFormatter)
    common(p)
    p.add_argument("--model", nargs="+", default=["swift_v2:debug", "swift_v2_revised:debug"],
                   help="models: family:size[@width] (random init) or exported .safetensors")
    p.add_argument("--max-lag", type=int, default=None, help="largest lag in frames (default: sequence length - 1)")

    p = sub.add_parser("recon", help="reconstructions of masked frames (Figure 5B)", formatter_class=HelpFormatter)
    common(p)
    p.add_argument("--model", default="swift_v2:debug",
                   help="one model: family:size[@width] (random init) or exported .safetensors")
    p.add_argument("--n-samples", type=int, default=2, help="windows shown in the plot")

    p = sub.add_parser("memory", help="memory vs sequence length, original vs revised SwiFT (Figure 5C)",
                       formatter_class=HelpFormatter)
    common(p, data=False)
    p.add_argument("--families", nargs="+", default=["swift_v2", "swift_v2_revised"], help="model families")
    p.add_argument("--size", default="51M", help="named size of the planner's prediction")
    p.add_argument("--memory-grid", type=int, nargs=3, default=[96, 96, 96], help="input grid of the prediction")
    p.add_argument("--lengths", type=int, nargs="+", default=[20, 40, 60, 80, 100],
                   help="sequence lengths in frames (lengths a family's windows cannot tile are skipped)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per GPU")
    p.add_argument("--checkpointing", action="store_true", help="predict with activation checkpointing")
    p.add_argument("--measure", action="store_true",
                   help="also measure the activations saved for backward on CPU at --measure-size")
    p.add_argument("--measure-size", default="debug", help="named size measured on CPU (at a 24^3 grid)")

    p = sub.add_parser("cka", help="linear CKA between models' per-stage representations",
                       formatter_class=HelpFormatter)
    common(p)
    p.add_argument("--model", nargs="+", default=["swift_v2:debug@16", "swift_v2:debug@32", "swift_v2_revised:debug"],
                   help="models: family:size[@width] (random init) or exported .safetensors")
    p.add_argument("--debiased", action="store_true",
                   help="unbiased HSIC (Song et al. 2012) instead of the biased estimator of Kornblith et al. 2019")
    return ap


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def _finite(v):
    """``inf``/``nan`` -> None, recursively (strict JSON)."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.storage) / args.study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "memory":
            res = run_memory(families=args.families, size=args.size, lengths=args.lengths, grid=args.memory_grid,
                             micro_batch=args.micro_batch, checkpointing=args.checkpointing, measure=args.measure,
                             measure_size=args.measure_size)
            plot = plot_memory
        else:
            from study.finetune import ensure_cohort

            manifest = args.manifest or ensure_cohort(out_dir / "cohort", n_subjects=12, n_frames=16)
            refs = [args.model] if isinstance(args.model, str) else list(args.model)
            models = [load_model(r, grid=args.grid, sequence_length=args.sequence_length, manifest=manifest,
                                 seed=args.seed) for r in refs]
            shapes = {(tuple(m.spec.grid), m.spec.sequence_length) for m in models}
            if len(shapes) > 1:
                raise ValueError(f"the models take different inputs (grid, frames): {sorted(shapes)}; compare "
                                 "models of one input size")
            grid, T = shapes.pop()
            x, bm, tr = load_windows(manifest, grid=grid, sequence_length=T, n_windows=args.n_windows,
                                     split=args.split)
            if args.command == "autocorr":
                res, plot = run_autocorr(models, x, bm, tr=tr, max_lag=args.max_lag), plot_autocorr
            elif args.command == "cka":
                res, plot = run_cka(models, x, debiased=args.debiased), plot_cka
            else:
                res = run_recon(models[0], x, bm, seed=args.seed)
                plot = lambda r, p: plot_recon(r, p, args.n_samples)  # noqa: E731
            res["models"] = [{"label": m.label, "weights": m.weights, "family": m.spec.family, "size": m.spec.size,
                              "width": m.spec.width} for m in models]
            res["manifest"], res["split"] = str(manifest), args.split
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    png, js = out_dir / f"{args.command}.png", out_dir / f"{args.command}.json"
    plot(res, png)
    arrays = {k for k, v in res.items() if isinstance(v, np.ndarray)}
    if arrays:  # recon: the volumes go to an .npz beside the JSON
        np.savez_compressed(out_dir / f"{args.command}.npz", **{k: res[k] for k in arrays})
    js.write_text(json.dumps(_finite({k: v for k, v in res.items() if k not in arrays}), indent=2,
                             default=_json_default))
    print(f"wrote {png} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
