"""Hand-written Triton kernels of the SwiFT encoders, kept apart from the model definitions.

* ``window_attn``: window attention forward and backward (``SwiftConfig.attn_impl="triton"``/``"auto"``).
* ``gelu_mlp``: the MLP with GELU, GELU' and the bias gradients in matmul epilogues (``mlp_impl="epilogue"``/``"auto"``).
* ``fused_mlp``: the MLP that recomputes its hidden activation in the backward (``fused_mlp=True``).
* ``fused_head``: the SimMIM decoder's last layer and loss in one kernel (``fused_head=True``).
* ``triton_launch``: what they share (availability, compute dtype, launch-configuration timing, MLP checks).

Each module falls back to PyTorch where Triton cannot run. The kernels are as measured on H100 (BENCHMARKS.md,
sessions 8-10); they moved here from ``neuro_models/swift/`` byte for byte apart from one import line.
This file imports nothing: ``fused_head`` imports ``..layers``, which imports ``window_attn`` and ``gelu_mlp``.
"""
