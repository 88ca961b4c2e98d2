"""Hand-written Triton kernels of NeuroMamba, kept apart from the model definition.

* ``selective_scan``: the fused Mamba-1 selective scan, forward and backward, with packed-sequence resets, as the
  ``torch.library`` custom op ``neuromamba::selective_scan_fwd`` (``scan_impl="fused"``, and ``"auto"`` on CUDA).

It runs on CUDA with Triton, and on CPU under the Triton interpreter (``TRITON_INTERPRET=1``) for the tests; the
chunked PyTorch scan (:mod:`neuro_models.mamba.scan`) is used everywhere else. This file imports nothing, so
importing :mod:`neuro_models.mamba.scan` does not import Triton.
"""
