"""Triton kernels for MoE routing and token movement, shipped as ``moetrain.kernels``.

Each kernel has a pure-torch reference beside it; the references are the oracle in tests
and the path used on CPU.
"""
