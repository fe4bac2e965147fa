"""Loads the compiled kernels when present and reports which backends are live.

dcfast always imports: without `dcfast._C` every op runs its plain-torch reference, and a single
warning says so. Backends are chosen per device: CPU -> C++ (`_C`); CUDA -> CUDA C++ when built,
else Triton when installed, else the reference.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Dict

import torch

OPS = ("dc_error", "dc_error_backward", "fisher_accumulate_")

_C_LOADED = False
_C_ERROR = ""
try:
    from dcfast import _C  # noqa: F401  (importing registers the torch.ops.dcfast kernels)

    _C_LOADED = True
except ImportError as error:  # built without the extension, or a broken build
    _C_ERROR = str(error)

# Which ops got a CUDA kernel from `_C` itself (CUDA C++), read before dcfast.ops registers Triton
# kernels for the ops that lack one: afterwards the dispatcher cannot tell the two apart.
_CUDA_CPP = {op: _C_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"dcfast::{op}", "CUDA") for op in OPS}

_WARNED = False


def extension_loaded() -> bool:
    """True when the compiled `dcfast._C` kernels are registered."""
    return _C_LOADED


def warn_if_reference_only() -> None:
    """Say once that the compiled kernels are missing and the torch reference runs instead."""
    global _WARNED
    if not _C_LOADED and not _WARNED:
        _WARNED = True
        warnings.warn(
            "dcfast: compiled kernels not found (" + _C_ERROR + "); running the torch reference. "
            "Reinstall with `pip install --no-build-isolation .` to build them.",
            RuntimeWarning,
            stacklevel=3,
        )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `dcfast::<op>` has a compiled kernel for `dispatch_key` ('CPU' or 'CUDA')."""
    if not _C_LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dcfast::{op}", dispatch_key)


def triton_available() -> bool:
    """Triton is importable (kernels run on CUDA devices, or on CPU under TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def cuda_cpp_ops() -> Dict[str, bool]:
    """{op: whether `_C` brought a CUDA C++ kernel for it} (Triton registrations do not count)."""
    return dict(_CUDA_CPP)


def backend_info() -> Dict[str, object]:
    """Which backends are live in this process, for logs and bug reports. 'cuda' is 'cuda-c++' only
    when `_C` brought CUDA C++ kernels for every op."""
    cuda_cpp = all(_CUDA_CPP.values())
    return {
        "torch": torch.__version__,
        "extension": _C_LOADED,
        "extension_error": _C_ERROR or None,
        "cpu": "c++" if has_kernel("dc_error", "CPU") else "reference",
        "cuda_device": torch.cuda.is_available(),
        "cuda": "cuda-c++" if cuda_cpp else ("triton" if triton_available() else "reference"),
        "triton": triton_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
