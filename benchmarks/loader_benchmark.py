"""Data-loader benchmark: legacy per-frame ``.pt`` vs per-subject HDF5 (several codecs).

Same synthetic subjects in every format. For each format and loader-worker count it measures, with a
cold page cache (``os.sync`` + ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file before the run):
windows/s and MB/s for ``--seq-len`` frames at the full grid, file opens per window, and the windows/s
predicted at a stated per-open latency (parallel filesystems pay a metadata round trip per open).
It also measures decode MB/s per core (warm cache, CPU time) and bytes on disk.

What is read: the ``.pt`` path loads ``seq-len`` frame files (full grid, float16, already scaled, as
SwiFT wrote them) and stacks them; the HDF5 path reads the float16 brain-box crop of one window through
:class:`data.datasets.WindowedDataset` (``grid=None, defer=True``: scaling, padding and the T-last
transpose run on the device, :func:`data.transforms.finish_on_device`). ``--cpu-finish`` adds the
row where the loader also finishes float32 model-grid tensors on the CPU.

Run (this 2-core box)::

    python benchmarks/loader_benchmark.py --grid 96 --subjects 8 --frames 60 --workers 0 2

on a 16-core GPU machine::

    python benchmarks/loader_benchmark.py --workers 0 2 16 --out-json $OUT/loader.json --out-md $OUT/loader.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.datasets import WindowedDataset  # noqa: E402
from data.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from data.subject_file import SubjectReader, transcode  # noqa: E402
from data.synthetic import generate_cohort  # noqa: E402
from data.transforms import scaling_coefficients  # noqa: E402

CODECS = ("none", "gzip", "lz4", "blosc-lz4", "zstd")


# ------------------------------------------------------------------------------------------- data
def prepare(root: Path, grid, subjects: int, frames: int, codecs, seed: int = 0) -> dict[str, Path]:
    """Generate once (uncompressed), transcode to each codec, write the legacy .pt layout."""
    base = root / "h5_none"
    man = generate_cohort(base, n_subjects=subjects, grid=grid, n_frames=frames, seed=seed, codec="none",
                          cohorts=["cohort_a"], progress=True, fractions=(1.0, 0.0, 0.0))
    m = Manifest.load(man)
    out = {"none": base}
    for codec in codecs:
        if codec == "none":
            continue
        d = root / f"h5_{codec}"
        df = m.df.copy()
        for p in df["path"]:
            dst = d / p
            if not dst.exists():
                transcode(m.resolve(p), dst, codec)
        Manifest(df, d / MANIFEST_NAME).save()
        out[codec] = d
    legacy = root / "legacy"
    for p, subj in zip(m.df["path"], m.df["subject"]):
        sdir = legacy / "img" / subj
        if (sdir / f"frame_{frames - 1}.pt").exists():
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        with SubjectReader(m.resolve(p)) as r:
            info = r.info
            mul, add, _ = scaling_coefficients("znorm_zeroback", info.stats, info.value_offset, info.value_scale)
            crop = r.read_frames(0, info.n_frames).astype(np.float32) * mul + add
            crop[:, ~r.mask] = 0
            sl = tuple(slice(o, o + s) for o, s in zip(info.crop_offset, info.crop_shape))
            for t in range(info.n_frames):
                vol = torch.zeros(info.orig_shape, dtype=torch.float16)
                vol[sl] = torch.from_numpy(crop[t]).to(torch.float16)
                torch.save(vol, sdir / f"frame_{t}.pt")
    out["legacy"] = legacy
    return out


def files_of(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file() and (p.suffix in (".h5", ".pt"))]


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in files_of(path))


def evict(path: Path) -> None:
    """Drop the page cache of every data file under ``path`` (cold-cache runs)."""
    os.sync()
    for p in files_of(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------- loaders
class LegacyWindows(torch.utils.data.Dataset):
    """The SwiFT v1 path: ``seq_len`` ``torch.load`` calls per window, stacked to ``[1, X, Y, Z, T]``."""

    def __init__(self, root: Path, windows: list[tuple[str, int]], seq_len: int):
        self.root, self.windows, self.seq_len = root, windows, seq_len
        self.opens = 0

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        subj, start = self.windows[i]
        vols = []
        for t in range(start, start + self.seq_len):
            vols.append(torch.load(self.root / "img" / subj / f"frame_{t}.pt", weights_only=True))
            self.opens += 1
        x = torch.stack(vols, dim=-1).unsqueeze(0)
        return {"x": x, "opens": self.opens, "pid": os.getpid()}


class H5Windows(torch.utils.data.Dataset):
    """WindowedDataset items plus this worker's open count."""

    def __init__(self, ds: WindowedDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        return {"x": item["x"], "opens": self.ds.opens, "pid": os.getpid()}


def run_loader(ds, order, workers: int) -> dict:
    sampler = list(order)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, sampler=sampler, num_workers=workers,
                                     prefetch_factor=2 if workers else None)
    t0 = time.perf_counter()
    c0 = time.process_time()
    t_first = None
    nbytes = 0
    opens: dict[int, int] = {}
    n = 0
    for item in dl:
        x = item["x"]
        nbytes += x.numel() * x.element_size()
        opens[item["pid"]] = max(opens.get(item["pid"], 0), int(item["opens"]))
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    t1 = time.perf_counter()
    cpu = time.process_time() - c0
    steady = (n - 1) / (t1 - t_first) if n > 1 and t1 > t_first else float("nan")
    return dict(windows=n, wall_s=t1 - t0, windows_per_s=n / (t1 - t0), steady_windows_per_s=steady,
                payload_MB_per_s=nbytes / 1e6 / (t1 - t0), cpu_ms_per_window=1e3 * cpu / n,
                opens_per_window=sum(opens.values()) / n)


def decode_rate(ds: WindowedDataset, order) -> float:
    """Decoded MB/s per core: warm page cache, HDF5 chunk cache off (every chunk really decoded), CPU time."""
    readers = {}
    for i in order:
        path, start, _ = ds.window(i)
        if path not in readers:
            readers[path] = SubjectReader(path, rdcc_nbytes=0)
        readers[path].read_frames(int(start), int(start) + ds.sequence_length)
    c0 = time.process_time()
    nbytes = 0
    for i in order:
        path, start, _ = ds.window(i)
        nbytes += readers[path].read_frames(int(start), int(start) + ds.sequence_length).nbytes
    dt = time.process_time() - c0
    for r in readers.values():
        r.close()
    return nbytes / 1e6 / max(dt, 1e-9)


def legacy_decode_rate(ds: LegacyWindows, order) -> float:
    for i in order:
        ds[i]
    c0 = time.process_time()
    nbytes = 0
    for i in order:
        nbytes += ds[i]["x"].numel() * 2
    return nbytes / 1e6 / max(time.process_time() - c0, 1e-9)


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/neurox_loader_bench"), help="data folder (reused)")
    ap.add_argument("--grid", type=int, default=96)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=CODECS)
    ap.add_argument("--open-latency-ms", type=float, nargs="+", default=[1.0, 5.0],
                    help="per-open latencies for the predicted windows/s (parallel filesystems)")
    ap.add_argument("--repeats", type=int, default=1, help="cold runs per cell (best kept)")
    ap.add_argument("--cpu-finish", action="store_true", help="also time float32 model-grid output on the CPU")
    ap.add_argument("--out-json", type=Path, default=Path("benchmarks/results/loader.json"))
    ap.add_argument("--out-md", type=Path, default=Path("benchmarks/results/loader.md"))
    ap.add_argument("--clean", action="store_true", help="delete --root afterwards")
    a = ap.parse_args(argv)

    grid = (a.grid,) * 3
    paths = prepare(a.root, grid, a.subjects, a.frames, a.codecs)
    m0 = Manifest.load(paths["none"] / MANIFEST_NAME)
    rng = np.random.default_rng(0)
    rows = []
    win_bytes_grid = int(np.prod(grid)) * a.seq_len * 2

    def mk(codec, **kw):
        m = Manifest.load(paths[codec] / MANIFEST_NAME)
        return WindowedDataset(m, split="train", sequence_length=a.seq_len, stride_between=1.0, scaling="znorm_zeroback",
                               **kw)

    ref = mk("none", grid=None, defer=True)
    order = rng.permutation(len(ref)).tolist()
    windows = [(Path(ref.window(i)[0]).stem, int(ref.window(i)[1])) for i in range(len(ref))]
    formats = [("legacy .pt", "legacy", None)] + [(f"hdf5 {c}", c, dict(grid=None, defer=True)) for c in a.codecs]
    if a.cpu_finish:
        formats.append(("hdf5 lz4 + CPU finish (fp32 grid)", "lz4", dict(grid=grid, defer=False)))
    formats = [f for f in formats if f[1] in paths]
    load_before = os.getloadavg()
    results: dict = {}
    # Repeats are interleaved over formats (best of N per cell), so a burst of load from other
    # processes on a shared machine does not hit one format only.
    for rep in range(a.repeats):
        for label, key, kw in formats:
            for w in a.workers:
                ds = LegacyWindows(paths["legacy"], windows, a.seq_len) if key == "legacy" else H5Windows(mk(key, **kw))
                evict(paths[key])
                r = run_loader(ds, order, w)
                best = results.get((label, w))
                if best is None or r["windows_per_s"] > best["windows_per_s"]:
                    results[(label, w)] = r
                print(f"[{rep + 1}/{a.repeats}] {label:36s} workers={w:2d} {r['windows_per_s']:7.1f} win/s "
                      f"(steady {r['steady_windows_per_s']:7.1f}, CPU {r['cpu_ms_per_window']:6.1f} ms/win in "
                      f"main)  opens/window {r['opens_per_window']:.2f}", flush=True)
    for label, key, kw in formats:
        row = dict(format=label, disk_MB=disk_bytes(paths[key]) / 1e6, windows=len(order))
        for w in a.workers:
            row[f"w{w}"] = results[(label, w)]
        if key == "legacy":
            row["decode_MB_per_s_per_core"] = legacy_decode_rate(LegacyWindows(paths["legacy"], windows, a.seq_len), order)
        else:
            row["decode_MB_per_s_per_core"] = decode_rate(mk(key, **kw), order)
        rows.append(row)

    base = rows[0]
    w_first = a.workers[0]
    for row in rows:
        r0 = row[f"w{w_first}"]
        row["speedup_vs_pt"] = r0["windows_per_s"] / base[f"w{w_first}"]["windows_per_s"]
        row["disk_ratio_pt_over_this"] = base["disk_MB"] / row["disk_MB"]
        row["predicted_windows_per_s"] = {
            str(lat): 1.0 / (1.0 / r0["windows_per_s"] + r0["opens_per_window"] * lat / 1e3) for lat in a.open_latency_ms}

    meta = dict(machine=platform.node(), cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, grid=grid, subjects=a.subjects,
                frames=a.frames, seq_len=a.seq_len, workers=a.workers, repeats=a.repeats,
                loadavg_before=load_before, loadavg_after=os.getloadavg(), cache="cold (os.sync + POSIX_FADV_DONTNEED)",
                window_grid_MB=win_bytes_grid / 1e6, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                crop_shape=list(SubjectReader(m0.resolve(m0.df["path"].iloc[0])).info.crop_shape))
    result = dict(meta=meta, rows=rows)
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=2))
    a.out_md.parent.mkdir(parents=True, exist_ok=True)
    a.out_md.write_text(markdown(result, a.workers, a.open_latency_ms))
    print(markdown(result, a.workers, a.open_latency_ms))
    if a.clean:
        shutil.rmtree(a.root, ignore_errors=True)
    return result


def markdown(result: dict, workers, latencies) -> str:
    m = result["meta"]
    lines = [f"Loader benchmark: {m['grid'][0]}^3 x T={m['seq_len']} float16 windows, {m['subjects']} subjects x "
             f"{m['frames']} frames (brain box {m['crop_shape']}), {m['cache']}, machine `{m['machine']}` "
             f"({m['cpu_count']} CPUs), best of {m['repeats']} interleaved cold runs, load average "
             f"{m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f}, {m['time']}.", ""]
    hdr = ["format", "disk MB", "disk .pt/x"] + [f"win/s w={w}" for w in workers] + \
          [f"grid MB/s w={workers[0]}", f"speedup vs .pt w={workers[0]}", f"CPU ms/win w={workers[0]}", "opens/window",
           "decode MB/s/core"] + \
          [f"pred. win/s @{lat:g} ms/open" for lat in latencies]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for r in result["rows"]:
        w0 = r[f"w{workers[0]}"]
        cells = [r["format"], f"{r['disk_MB']:.0f}", f"{r['disk_ratio_pt_over_this']:.2f}x"]
        cells += [f"{r[f'w{w}']['windows_per_s']:.1f} ({r[f'w{w}']['steady_windows_per_s']:.1f})" for w in workers]
        cells += [f"{w0['windows_per_s'] * m['window_grid_MB']:.0f}", f"{r['speedup_vs_pt']:.2f}x",
                  f"{w0['cpu_ms_per_window']:.1f}", f"{w0['opens_per_window']:.2f}", f"{r['decode_MB_per_s_per_core']:.0f}"]
        cells += [f"{r['predicted_windows_per_s'][str(lat)]:.1f}" for lat in latencies]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "win/s: whole cold run incl. worker start-up (windows / wall time), in brackets the steady rate "
              "after the first window; grid MB/s: windows/s x the "
              "full-grid fp16 window size; CPU ms/win: CPU time of the loading process per window (with workers > 0 the work is in the workers, so only w=0 is meaningful); opens/window: file opens in all workers / windows; predicted: "
              "1 / (1/win_s + opens_per_window x latency)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
