"""data.transforms.all_finite: the loader's per-window check, one reduction instead of isfinite().all()."""
from __future__ import annotations

import pytest
import torch

from data.transforms import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_anywhere_is_found(dtype, bad):
    x = torch.randn(1, 5, 7, 6, 4).to(dtype)
    assert all_finite(x)
    for pos in [(0, 0, 0, 0, 0), (0, 2, 3, 1, 2), (0, 4, 6, 5, 3)]:
        y = x.clone()
        y[pos] = bad
        assert not all_finite(y), (dtype, bad, pos)
        assert all_finite(y) == bool(torch.isfinite(y).all())


def test_extremes_and_non_float_inputs():
    big = torch.full((3, 4), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert all_finite(big) and all_finite(-big)
    assert all_finite(torch.ones(3, dtype=torch.int64)) and all_finite(torch.empty(0))
