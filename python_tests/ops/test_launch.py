"""Launch plumbing shared by the backends: the Triton launchers' device guard (and both ops on a second
GPU, where one exists) and which CUDA backend `backend_info` reports."""
from types import SimpleNamespace

import pytest
import torch

from dcfast import _backend
from dcfast.ops import dc_error, dc_error_reference, fisher_accumulate_, fisher_accumulate_reference

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@needs_triton
def test_device_guard_selects_the_tensor_device():
    """A tensor on cuda:1 makes cuda:1 current for the launch (entering it needs a GPU, building it not);
    CPU tensors (the interpreter) get a no-op."""
    from dcfast.kernels._launch import device_guard

    guard = device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with device_guard(torch.zeros(1)):
        pass


@needs_two_gpus
@needs_triton
def test_triton_on_the_second_gpu_while_the_first_is_current():
    from dcfast.kernels import dc_error as triton_dc_error
    from dcfast.kernels import fisher as triton_fisher

    gen = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(2, 3, 4, 40, generator=gen), torch.randn(2, 4, 40, generator=gen)
    fisher, g, x = torch.rand(6, 33, generator=gen), torch.randn(5, 17, 6, generator=gen), torch.randn(5, 17, 33, generator=gen)
    with torch.cuda.device(0):
        err = triton_dc_error.dc_error_forward(pred.to("cuda:1"), noise.to("cuda:1"), "l2", 1.0)
        got = fisher.to("cuda:1")
        triton_fisher.fisher_accumulate_(got, g.to("cuda:1"), x.to("cuda:1"))
        public = dc_error(pred.to("cuda:1"), noise.to("cuda:1"))
        public_fisher = fisher_accumulate_(fisher.to("cuda:1"), g.to("cuda:1"), x.to("cuda:1"))
    want = dc_error_reference(pred, noise)
    want_fisher = fisher_accumulate_reference(fisher, g, x)
    for result, expected in ((err, want), (public, want), (got, want_fisher), (public_fisher, want_fisher)):
        assert result.device == torch.device("cuda:1")
        torch.testing.assert_close(result.cpu(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_backend_info_reports_cuda_cpp_only_for_kernels_from_the_extension(monkeypatch):
    """Triton kernels registered for CUDA (when no CUDA C++ was built) must not read as 'cuda-c++': the
    report uses what `_C` registered before dcfast.ops added anything."""
    monkeypatch.setattr(_backend, "_CUDA_CPP", {op: True for op in _backend.OPS})
    assert _backend.backend_info()["cuda"] == "cuda-c++"
    monkeypatch.setattr(_backend, "_CUDA_CPP", {op: op != "fisher_accumulate_" for op in _backend.OPS})
    assert _backend.backend_info()["cuda"] in ("triton", "reference")
    assert _backend.cuda_cpp_ops() == {"dc_error": True, "dc_error_backward": True, "fisher_accumulate_": False}


def test_cuda_cpp_matches_the_dispatcher_at_import():
    """Where dcfast.ops added no Triton kernel for CUDA, the snapshot agrees with the dispatcher."""
    if torch.cuda.is_available() and not all(_backend.cuda_cpp_ops().values()):
        pytest.skip("dcfast.ops registered Triton CUDA kernels for the ops without CUDA C++")
    for op in _backend.OPS:
        assert _backend.cuda_cpp_ops()[op] == _backend.has_kernel(op, "CUDA")
