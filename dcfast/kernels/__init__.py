"""Triton kernels (CUDA devices; CPU under TRITON_INTERPRET=1)."""
