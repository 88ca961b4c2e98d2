"""What the hand-written Triton kernels of the SwiFT family (``fused_head``, ``fused_mlp``, ``gelu_mlp``,
``window_attn``) share: whether they can run on a device, the dtype they compute in, the per-shape choice of a launch
configuration by timing each once, and what the two MLPs require of their layers and tensors."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs lack it
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

#: the Triton interpreter is on (read once: ``available`` runs inside ``torch.compile`` traces)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether Triton kernels can run for tensors on ``device``: CUDA with Triton installed, or CPU tensors under
    the Triton interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input ``x``: autocast's for ``x``'s device if it is on, else ``x``'s."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def mlp_usable(x: torch.Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> bool:
    """What a Triton MLP (``fused_mlp``, ``gelu_mlp``) needs besides its own width rule: Triton for ``x``'s device, a
    bf16/fp16 compute dtype, both biases, and whole weights (DeepSpeed ZeRO-3 marks partitioned ones with ``ds_id``)."""
    return (available(x.device) and fc1.bias is not None and fc2.bias is not None
            and compute_dtype(x) in (torch.bfloat16, torch.float16)
            and not hasattr(fc1.weight, "ds_id") and not hasattr(fc2.weight, "ds_id"))


def check_mlp_shapes(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
    """The MLP kernels index raw pointers: a wrong shape would read out of bounds, so it is refused here with a
    ``ValueError`` that names the tensor."""
    if x.dim() != 2 or w1.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} and fc1 weight {tuple(w1.shape)} must be 2-D ([tokens, width], "
                         "[hidden, width])")
    (M, C), H = x.shape, w1.shape[0]
    want = {"fc1 weight": (H, C), "fc1 bias": (H,), "fc2 weight": (C, H), "fc2 bias": (C,)}
    for (name, shape), t in zip(want.items(), (w1, b1, w2, b2)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)}; expected {shape} for x of shape {(M, C)} and hidden "
                             f"width {H}")


def fastest(configs: list[dict], make_run: Callable[[dict], Callable[[], None]], what: str,
            repeats: int = 3) -> tuple[dict, dict[str, float]]:
    """The fastest of ``configs`` and every configuration's time in ms (``{str(config): ms}``).

    ``make_run(config)`` prepares one configuration (its buffers) and returns the call to time; it is called once
    to compile, then timed over ``repeats`` calls (CUDA events on a GPU, the wall clock elsewhere). A configuration
    that raises (e.g. out of shared memory on this card) is skipped; if none runs, ``RuntimeError`` names ``what``.
    """
    times = {}
    for i, cfg in enumerate(configs):
        try:
            run = make_run(cfg)
            run()  # compile
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    run()
                end.record()
                torch.cuda.synchronize()
                times[i] = start.elapsed_time(end) / repeats
            else:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    run()
                times[i] = (time.perf_counter() - t0) * 1e3 / repeats
        except Exception:  # noqa: BLE001 - a configuration the card cannot run is skipped
            continue
    if not times:
        raise RuntimeError(f"no launch configuration of the {what} ran")
    return configs[min(times, key=times.get)], {str(configs[i]): round(t, 4) for i, t in times.items()}


def tuned(cache: dict, timings: dict, k, configs: list[dict], run: Callable[[dict], None], what: str,
          device_type: str) -> dict:
    """The launch configuration cached at ``cache[k]``, else: on CUDA (and not while a CUDA graph is captured) the
    :func:`fastest` of ``configs``, run by ``run(config)``, cached with its ``timings``; elsewhere the first."""
    if k in cache:
        return cache[k]
    if device_type != "cuda" or torch.cuda.is_current_stream_capturing():
        return configs[0]
    cache[k], timings[k] = fastest(configs, lambda cfg: lambda: run(cfg), what)
    return cache[k]
