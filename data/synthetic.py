"""Synthetic fMRI cohorts with planted ground truth, written straight to the subject-file format.

Each subject is brain-masked 4-D data on a cubic-ish grid:

* the brain mask is the real MNI152 brain mask bundled with nilearn (no download), resampled
  isotropically so the brain fills ~90% of the grid and centred;
* ``n_networks`` spatially smooth network maps (sums of Gaussian blobs inside the brain, shared by
  every subject, seeded by ``seed``);
* per-network time courses: correlated innovations -> AR(1) -> canonical double-gamma HRF sampled
  at the cohort's TR; each voxel is ``baseline * (1 + 1% * (sum_k map_k * amp_k * s_k(t) + noise))``;
* optionally (``texture > 0``) a fine anatomical texture with a power-law spectrum multiplied into the
  static tissue field (:func:`texture_field`), shared by the cohort;
* latent subject traits: ``trait_cont`` (continuous) scales network amplitudes along a fixed
  +-1 pattern, ``trait_bin`` (0/1) raises the coupling between network pairs (0,1) and (2,3) and
  the amplitude of network 4. Subject-level random amplitude/coupling jitter and the cohort's noise
  keep the labels learnable but not trivial.

Cohorts differ in TR, noise, AR coefficient and trait distributions (see :data:`DEFAULT_COHORTS`).
Everything is deterministic given ``seed`` (and independent of ``workers``).
"""
from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data.manifest import MANIFEST_NAME, Manifest
from data.subject_file import DEFAULT_CODEC, is_complete, read_info, write_subject


@dataclass(frozen=True, kw_only=True)
class CohortSpec:
    """One synthetic cohort (site/dataset) and how its subjects differ from other cohorts'."""

    name: str
    """Cohort name (manifest ``cohort`` column and sub-folder)."""
    weight: float = 1.0
    """Share of ``n_subjects`` given to this cohort (normalised over cohorts)."""
    tr: float = 0.8
    """Repetition time in seconds."""
    noise: float = 1.0
    """Voxel noise std in % of baseline signal."""
    ar: float = 0.5
    """AR(1) coefficient of the neural innovations."""
    trait_mean: float = 0.0
    """Mean of ``trait_cont``."""
    trait_std: float = 1.0
    """Std of ``trait_cont``."""
    trait_p: float = 0.5
    """P(``trait_bin`` = 1)."""
    baseline: float = 1000.0
    """Mean raw intensity of brain voxels."""


DEFAULT_COHORTS: tuple[CohortSpec, ...] = (
    CohortSpec(name="cohort_a", weight=0.5, tr=0.8, noise=1.0, ar=0.5, trait_mean=0.0, trait_std=1.0,
               trait_p=0.5, baseline=1000.0),
    CohortSpec(name="cohort_b", weight=0.3, tr=1.0, noise=1.5, ar=0.6, trait_mean=0.3, trait_std=0.8,
               trait_p=0.4, baseline=600.0),
    CohortSpec(name="cohort_c", weight=0.2, tr=2.0, noise=2.0, ar=0.3, trait_mean=-0.3, trait_std=1.2,
               trait_p=0.6, baseline=1500.0),
)

N_NETWORKS = 8
AMP_PATTERN = np.array([1, -1, 1, -1, 1, -1, 1, -1], dtype=np.float64)  # trait_cont direction
TRAIT_CONT_GAIN = 0.25   # log-amplitude per unit trait_cont
TRAIT_BIN_COUPLING = 0.45  # added correlation of pairs (0,1), (2,3) when trait_bin = 1
TRAIT_BIN_AMP = 0.3      # log-amplitude gain of network 4 when trait_bin = 1
SIGNAL_PCT = 1.5         # network signal amplitude in % of baseline


@functools.lru_cache(maxsize=8)
def brain_mask(grid: tuple[int, int, int]) -> np.ndarray:
    """The MNI152 brain mask (nilearn, 2 mm) resampled isotropically to fit ``grid`` (bool, centred)."""
    from nilearn.datasets import load_mni152_brain_mask
    from scipy import ndimage

    grid = tuple(int(g) for g in grid)
    m = np.asarray(load_mni152_brain_mask(resolution=2).dataobj) > 0.5
    idx = np.nonzero(m)
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    box = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    zoom = min(0.9 * g / b for g, b in zip(grid, box.shape))
    small = ndimage.zoom(box, zoom, order=1) > 0.5
    small = small[tuple(slice(0, min(s, g)) for s, g in zip(small.shape, grid))]
    out = np.zeros(grid, dtype=bool)
    start = [(g - s) // 2 for g, s in zip(grid, small.shape)]
    out[tuple(slice(a, a + s) for a, s in zip(start, small.shape))] = small
    if not out.any():
        raise ValueError(f"grid={grid} is too small for a brain mask")
    return out


def network_maps(mask: np.ndarray, n_networks: int = N_NETWORKS, seed: int = 0) -> np.ndarray:
    """Smooth spatial maps ``(K, V)`` over the brain voxels of ``mask`` (peak 1 each)."""
    rng = np.random.default_rng([seed, 7919])
    coords = np.argwhere(mask)                       # (V, 3)
    grid = np.array(mask.shape, dtype=np.float64)
    maps = np.zeros((n_networks, len(coords)), dtype=np.float64)
    for k in range(n_networks):
        for _ in range(3):
            c = coords[rng.integers(len(coords))].astype(np.float64)
            sigma = grid.min() * rng.uniform(0.07, 0.14)
            d2 = (((coords - c) / sigma) ** 2).sum(axis=1)
            maps[k] += rng.uniform(0.6, 1.0) * np.exp(-0.5 * d2)
        maps[k] /= maps[k].max()
    return maps.astype(np.float32)


def network_parcellation(mask: np.ndarray, maps_KV: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """The cohort's own parcellation: labels ``(X, Y, Z)`` int32, voxel -> ``1 + argmax_k map_k`` where the largest
    map is at least ``threshold`` of its peak, else 0 (background, and brain voxels no network reaches)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best = maps_KV.argmax(axis=0)
    labels[mask] = np.where(maps_KV.max(axis=0) >= threshold, best + 1, 0)
    return labels


def tissue_field(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Smooth per-voxel baseline multiplier in [0.7, 1.3] over brain voxels ``(V,)``."""
    coords = np.argwhere(mask).astype(np.float64)
    c = coords.mean(axis=0)
    r = np.sqrt((((coords - c) / (np.array(mask.shape) / 2.0)) ** 2).sum(axis=1))
    rng = np.random.default_rng([seed, 104729])
    phase = rng.uniform(0, 2 * np.pi, size=3)
    wave = np.sin(coords / np.array(mask.shape) * 2 * np.pi + phase).sum(axis=1) / 3.0
    return (1.0 + 0.2 * np.cos(np.pi * np.clip(r, 0, 1)) + 0.1 * wave).astype(np.float32)


def texture_field(mask: np.ndarray, seed: int = 0, exponent: float = 1.0) -> np.ndarray:
    """Anatomical texture: a Gaussian random field over the brain voxels of ``mask`` ``(V,)`` with the power-law
    amplitude spectrum ``|f|^-exponent`` (grey/white matter, folding), zero mean and unit std over the brain."""
    rng = np.random.default_rng([seed, 15485863])
    white = rng.standard_normal(mask.shape)
    f = np.sqrt(sum(np.meshgrid(*[np.fft.fftfreq(n) ** 2 for n in mask.shape], indexing="ij")))
    f[0, 0, 0] = np.inf  # no mean component
    field = np.real(np.fft.ifftn(np.fft.fftn(white) * f ** -exponent))[mask]
    return ((field - field.mean()) / field.std()).astype(np.float32)


def hrf(tr: float, duration: float = 30.0) -> np.ndarray:
    """Canonical double-gamma HRF (SPM shape: peaks 6 s / 16 s, ratio 1/6) sampled at ``tr``, unit sum."""
    from scipy.stats import gamma

    t = np.arange(0.0, duration, tr)
    h = gamma.pdf(t, 6.0) - gamma.pdf(t, 16.0) / 6.0
    return h / h.sum()


def subject_traits(spec: CohortSpec, cohort_index: int, i: int, seed: int) -> dict:
    """Latent traits and nuisance draws of subject ``i`` of a cohort (deterministic)."""
    rng = np.random.default_rng([seed, cohort_index, i, 1])
    trait_cont = float(rng.normal(spec.trait_mean, spec.trait_std))
    trait_bin = int(rng.random() < spec.trait_p)
    return dict(trait_cont=trait_cont, trait_bin=trait_bin, amp_jitter=rng.normal(0, 0.15, N_NETWORKS),
                coupling_jitter=float(rng.normal(0, 0.1)), scale=float(rng.uniform(0.9, 1.1)))


def subject_series(spec: CohortSpec, cohort_index: int, i: int, seed: int, n_frames: int, mask: np.ndarray,
                   maps_KV: np.ndarray, tissue_V: np.ndarray, trait_scale: float = 1.0) -> tuple[np.ndarray, dict]:
    """One subject's BOLD ``(X, Y, Z, T)`` float32 and its labels (``trait_scale`` multiplies the planted effects)."""
    tr = subject_traits(spec, cohort_index, i, seed)
    rng = np.random.default_rng([seed, cohort_index, i, 2])
    K = maps_KV.shape[0]
    # Coupling: correlated innovations.
    C = np.eye(K)
    rho = np.clip(0.1 + trait_scale * TRAIT_BIN_COUPLING * tr["trait_bin"] + tr["coupling_jitter"], -0.8, 0.8)
    for a, b in ((0, 1), (2, 3)):
        C[a, b] = C[b, a] = rho
    L = np.linalg.cholesky(C)
    h = hrf(spec.tr)
    burn = len(h) + 20
    e = L @ rng.standard_normal((K, n_frames + burn))
    s = np.empty_like(e)
    s[:, 0] = e[:, 0]
    for t in range(1, e.shape[1]):
        s[:, t] = spec.ar * s[:, t - 1] + e[:, t]
    s = np.stack([np.convolve(sk, h)[: e.shape[1]] for sk in s])[:, burn:]
    s = (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-8)
    log_amp = trait_scale * TRAIT_CONT_GAIN * tr["trait_cont"] * AMP_PATTERN[:K] + tr["amp_jitter"][:K]
    log_amp[4 % K] += trait_scale * TRAIT_BIN_AMP * tr["trait_bin"]
    S_TK = (s * np.exp(log_amp)[:, None]).T.astype(np.float32)
    noise_TV = rng.standard_normal((n_frames, maps_KV.shape[1]), dtype=np.float32)
    pct_TV = SIGNAL_PCT * (S_TK @ maps_KV) + np.float32(spec.noise) * noise_TV
    base_V = np.float32(spec.baseline * tr["scale"]) * tissue_V
    X_TV = base_V * (1.0 + 0.01 * pct_TV)
    bold = np.zeros(mask.shape + (n_frames,), dtype=np.float32)
    bold[mask] = X_TV.T
    return bold, dict(trait_cont=tr["trait_cont"], trait_bin=tr["trait_bin"])


def _split_counts(n: int, weights: Sequence[float]) -> list[int]:
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"cohort weights {list(w)} must be non-negative with a positive sum")
    raw = n * w / w.sum()
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    return counts.tolist()


_WORKER: dict = {}


def _init_worker(state: dict) -> None:
    _WORKER.clear()
    _WORKER.update(state)


def _make_one(job: tuple) -> dict:
    spec, cohort_index, i, out_path = job
    st = _WORKER
    subject = Path(out_path).stem
    fp = st["fingerprint"] + f":{cohort_index}:{i}"
    if is_complete(out_path, fp):
        info = read_info(out_path)
        labels = subject_traits(spec, cohort_index, i, st["seed"])
        labels = dict(trait_cont=labels["trait_cont"], trait_bin=labels["trait_bin"])
    else:
        bold, labels = subject_series(spec, cohort_index, i, st["seed"], st["n_frames"], st["mask"],
                                      st["maps"], st["tissue"], st.get("trait_scale", 1.0))
        info = write_subject(out_path, bold, st["mask"], tr=spec.tr, affine=st["affine"], subject=subject,
                             cohort=spec.name, codec=st["codec"], source_fingerprint=fp, extra_attrs=labels)
    return dict(subject=info.subject, cohort=spec.name, path=str(out_path), n_frames=info.n_frames, tr=info.tr,
                content_sha256=info.content_sha256, **labels)


def generate_cohort(root: str | os.PathLike, n_subjects: int = 64, grid: Sequence[int] = (48, 48, 48),
                    n_frames: int = 40, seed: int = 0, cohorts: Sequence[CohortSpec | str] | None = None,
                    workers: int = 1, progress: bool = True, codec: str = DEFAULT_CODEC,
                    fractions: Sequence[float] = (0.8, 0.1, 0.1), texture: float = 0.0,
                    texture_exponent: float = 1.0, trait_scale: float = 1.0) -> Path:
    """Generate a synthetic multi-cohort dataset under ``root``; return the manifest path.

    Parameters
    ----------
    root : path-like
        Output folder: ``<root>/<cohort>/<subject>.h5`` and ``<root>/manifest.parquet``.
    n_subjects : int
        Total subjects, shared among cohorts by their ``weight``.
    grid : (X, Y, Z)
        Spatial grid (e.g. 24^3 or 32^3 for demos, 48^3 for tests, 96^3 for benchmarks).
    n_frames : int
        Frames per subject.
    seed : int
        Seed of everything (maps, traits, noise, splits). Same seed -> identical files.
    cohorts : sequence of CohortSpec or names of :data:`DEFAULT_COHORTS`, optional
        Cohorts to generate (default: all of :data:`DEFAULT_COHORTS`).
    workers : int
        Processes used (results do not depend on it).
    progress : bool
        Show a tqdm progress bar.
    codec : str
        Compression codec of the subject files.
    fractions : (train, val, test)
        Subject-level split fractions persisted in the manifest.
    texture : float
        Std, as a fraction of the baseline, of an anatomical texture multiplied into the smooth tissue field:
        ``tissue * (1 + texture * texture_field(mask, seed, texture_exponent))``, shared by the cohort's
        subjects. 0 (default): the smooth field alone, the cohort of earlier versions exactly.
    texture_exponent : float
        Power-law exponent of the texture's amplitude spectrum (larger: smoother).
    trait_scale : float
        Multiplier of the planted trait effects (``trait_cont`` log-amplitude gain, ``trait_bin`` coupling and
        amplitude gain; the coupling stays clipped at 0.8). 1 (default): the cohort of earlier versions exactly.
        Larger values make the labels easier to learn from short runs (see data/README.md for the ceilings).

    Returns
    -------
    pathlib.Path
        Path of ``manifest.parquet``. Subjects already present with identical generation
        parameters are kept (a rerun is cheap).
    """
    from tqdm.auto import tqdm

    if n_subjects < 1:
        raise ValueError(f"n_subjects={n_subjects} must be >= 1")
    if n_frames < 1:
        raise ValueError(f"n_frames={n_frames} must be >= 1")
    if not (np.isfinite(texture) and 0 <= texture < 1):
        raise ValueError(f"texture={texture} must be in [0, 1) (a fraction of the baseline)")
    if not np.isfinite(texture_exponent):
        raise ValueError(f"texture_exponent={texture_exponent} must be a finite number")
    if not (np.isfinite(trait_scale) and trait_scale >= 0):
        raise ValueError(f"trait_scale={trait_scale} must be a finite number >= 0")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 8:
        raise ValueError(f"grid={grid} must be three sizes >= 8")
    by_name = {c.name: c for c in DEFAULT_COHORTS}
    specs: list[CohortSpec] = []
    for c in cohorts if cohorts is not None else DEFAULT_COHORTS:
        if isinstance(c, str):
            if c not in by_name:
                raise ValueError(f"cohorts: unknown cohort {c!r}; allowed names: {sorted(by_name)} or CohortSpec")
            c = by_name[c]
        specs.append(c)
    if len({c.name for c in specs}) != len(specs):
        raise ValueError("cohorts: names must be unique")
    root = Path(root)
    mask = brain_mask(grid)
    maps = network_maps(mask, N_NETWORKS, seed)
    tissue = tissue_field(mask, seed)
    fingerprint = f"synthetic-v1:{grid}:{n_frames}:{seed}:{codec}"
    if texture:
        tissue = np.clip(tissue * (1.0 + np.float32(texture) * texture_field(mask, seed, texture_exponent)), 0.2, None)
        fingerprint += f":texture{texture:g}^{texture_exponent:g}"
    if trait_scale != 1.0:
        fingerprint += f":traits{trait_scale:g}"
    affine = np.diag([192.0 / grid[0], 192.0 / grid[1], 192.0 / grid[2], 1.0])
    cohort_fp = hashlib.sha256(repr([asdict(c) for c in specs]).encode()).hexdigest()[:12]
    state = dict(mask=mask, maps=maps, tissue=tissue, affine=affine, seed=seed, n_frames=n_frames, codec=codec,
                 fingerprint=f"{fingerprint}:{cohort_fp}", trait_scale=float(trait_scale))
    jobs = []
    for ci, (spec, n) in enumerate(zip(specs, _split_counts(n_subjects, [c.weight for c in specs]))):
        for i in range(n):
            jobs.append((spec, ci, i, root / spec.name / f"sub-{ci}{i:05d}.h5"))
    bar = tqdm(total=len(jobs), desc=f"synthetic {grid}x{n_frames}", disable=not progress, unit="subj")
    records = []
    if workers <= 1:
        _init_worker(state)
        for job in jobs:
            records.append(_make_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(state,)) as ex:
            for rec in ex.map(_make_one, jobs, chunksize=4):
                records.append(rec)
                bar.update()
    bar.close()
    for r in records:
        r["path"] = os.path.relpath(r["path"], root)
    m = Manifest.from_records(records, path=root / MANIFEST_NAME, fractions=fractions, seed=seed)
    _save_parcellation(root, network_parcellation(mask, maps), affine)
    return m.save()


def _save_parcellation(root: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """``<root>/network_atlas.npz`` (``labels``, ``affine``), written atomically: the planted networks as an atlas
    (``atlas="networks"`` of :mod:`data.connectivity`). Not in the manifest, so content hashes do not depend on it."""
    tmp = root / f".network_atlas.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, labels=labels, affine=affine)
    os.replace(tmp, root / "network_atlas.npz")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data.synthetic --root DIR [--n-subjects N --grid X Y Z --frames T --seed S --workers W]``.

    Generates a cohort, prints the manifest summary and the shape/stats of one training window.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data.synthetic", description="Generate a synthetic fMRI cohort.")
    ap.add_argument("--root", required=True, help="output folder")
    ap.add_argument("--n-subjects", type=int, default=64)
    ap.add_argument("--grid", type=int, nargs=3, default=(48, 48, 48), metavar=("X", "Y", "Z"))
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--codec", default=DEFAULT_CODEC)
    a = ap.parse_args(argv)
    path = generate_cohort(a.root, n_subjects=a.n_subjects, grid=a.grid, n_frames=a.frames, seed=a.seed,
                           workers=a.workers, codec=a.codec)
    from data.datasets import WindowedDataset

    m = Manifest.load(path)
    print(m)
    ds = WindowedDataset(m, split="train", sequence_length=min(20, a.frames), grid=tuple(a.grid))
    it = ds[0]
    x = it["x"][0][it["brain_mask"]]
    print(f"{len(ds)} train windows; x {tuple(it['x'].shape)} brain mean {float(x.mean()):.3f} std {float(x.std()):.3f}")
    print(f"manifest: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
