"""What every Triton launcher needs besides its kernel."""
from __future__ import annotations

import contextlib

import torch


def device_guard(tensor: torch.Tensor):
    """Make `tensor`'s CUDA device current for a launch.

    Triton launches on the *current* device and reads raw pointers: with tensors on cuda:1 while
    cuda:0 is current, the kernel would run on cuda:0 against cuda:1's addresses. A no-op for CPU
    tensors (the interpreter), so the launchers share one code path.
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
