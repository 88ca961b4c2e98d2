"""Device helpers that keep model code free of CUDA-only calls."""
from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device supports it (CUDA with bf16, XPU, CPU), else None."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type in ("xpu", "cpu"):
        return torch.bfloat16
    return None
