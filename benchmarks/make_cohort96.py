"""The GPU sessions' 32-subject synthetic 96^3 cohort (60 frames) at ``argv[1]``, made once; prints its manifest.

The GPU image lacks nilearn: the committed MNI152 mask at 96^3 (``benchmarks/mni152_brain_mask_96.npz``) stands in
for the cohort's brain mask (set before the cohort's workers fork, so they see it too).

    python3 benchmarks/make_cohort96.py /tmp/neurox_cohort96
"""
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import data.synthetic as S  # noqa: E402

try:
    import nilearn  # noqa: F401
except ImportError:
    _m = np.load(HERE / "mni152_brain_mask_96.npz")["mask"].astype(bool)
    S.brain_mask = lambda grid: _m
from train_scaling import ensure_cohort  # noqa: E402

t = time.time()
print(ensure_cohort(Path(sys.argv[1]), 32, 60), f"{time.time() - t:.0f} s")
