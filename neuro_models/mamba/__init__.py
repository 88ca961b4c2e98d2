"""NeuroMamba: a Mamba state-space foundation model over 4D fMRI patch sequences.

See :mod:`.model` (architecture), :mod:`.tokens` (patch order, Fourier positions, background removal
and packing), :mod:`.scan` (selective scan implementations) and :mod:`.family` (registry protocol).
"""
from .config import SIZES, NeuroMambaConfig
from .model import NeuroMambaEncoder, NeuroMambaForTask, NeuroMambaPretrain

__all__ = ["SIZES", "NeuroMambaConfig", "NeuroMambaEncoder", "NeuroMambaForTask", "NeuroMambaPretrain"]
