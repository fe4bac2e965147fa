"""Triton kernels (CUDA devices; CPU under TRITON_INTERPRET=1). May import: nothing of dcfast but `dcfast._backend`."""
