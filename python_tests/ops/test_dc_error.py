"""dcfast::dc_error: every backend against the plain-torch reference (errors and both gradients),
gradcheck, opcheck, a torch.compile smoke test, and the errors raised on bad input.

Backends: on CPU the C++ kernel (`torch.ops`), the public `dcfast.ops.dc_error`, and the Triton
launchers under TRITON_INTERPRET=1; on CUDA (skipped without a GPU) `torch.ops` (CUDA C++ when
built, else Triton), the public function, and the Triton launchers called directly.
"""
import os
import subprocess
import sys

import pytest
import torch

from dcfast import _backend
from dcfast.ops import dc_error, dc_error_reference

LOSSES = ("l2", "l1", "huber")
DELTA = 0.5  # huber_delta: randn differences land on both sides of it
SHAPES = {  # (B, K, T, D)
    "B2-K3-T4-D5": (2, 3, 4, 5),
    "B1-K1-T1-D1": (1, 1, 1, 1),
    "B1-K4-T3-D1100": (1, 4, 3, 1100),  # D spans two Triton chunks (1024) and is no multiple of 256 threads
    "B3-K1-T2-D33": (3, 1, 2, 33),
    "B2-K2-T1-D257": (2, 2, 1, 257),
    # CUDA C++ layouts: a warp per row with 128-bit loads (D % 8 == 0, 12 rows: a partly filled block),
    # the whole block per row (D > 4096) with and without 128-bit loads.
    "B2-K3-T2-D64": (2, 3, 2, 64),
    "B1-K2-T3-D4104": (1, 2, 3, 4104),
    "B1-K1-T2-D4099": (1, 1, 2, 4099),
}
# Gradients are written in the input dtype: rtol and atol relative to the largest expected entry.
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
INTERPRET_DTYPES = (torch.float32, torch.float16)  # the interpreter computes bfloat16 wrongly

needs_cpu_kernel = pytest.mark.skipif(not _backend.has_kernel("dc_error", "CPU"), reason="dcfast._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")


# The Triton interpreter must be on before triton is first imported (triton.language's own @jit
# helpers, e.g. tl.sum, are built at import), so the interpreted launchers run in a child process,
# on inputs saved by this one; the comparison with the reference happens here, case by case.
_INTERPRET_CHILD = """
import sys, traceback, torch
from dcfast.kernels import dc_error as kernels
guarded, guard = [], kernels.device_guard
kernels.device_guard = lambda t: guarded.append(str(t.device)) or guard(t)
out = {"guarded": guarded}
for key, (pred, noise, grad_err, loss, delta) in torch.load(sys.argv[1]).items():
    try:
        out[key] = (kernels.dc_error_forward(pred, noise, loss, delta),
                    kernels.dc_error_backward(grad_err, pred, noise, loss, delta))
    except Exception:
        out[key] = traceback.format_exc()
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted_outputs(tmp_path_factory):
    """{(shape, loss, dtype): (err, grad_pred) or a traceback} from the launchers under TRITON_INTERPRET=1."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases = {
        (shape, loss, str(dtype)): (*_inputs(shape, dtype, "cpu"), loss, DELTA)
        for shape in SHAPES.values() for loss in LOSSES for dtype in INTERPRET_DTYPES
    }
    torch.save(cases, folder / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-c", _INTERPRET_CHILD, str(folder / "inputs.pt"), str(folder / "outputs.pt")]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    return torch.load(folder / "outputs.pt")


def _inputs(shape, dtype, device):
    """pred, noise, grad_err; a third of the D positions are exact ties (d = 0: the l1/huber kink)."""
    B, K, T, D = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    noise = torch.randn(B, T, D, generator=gen)
    pred = torch.randn(B, K, T, D, generator=gen)
    pred[..., ::3] = noise[:, None, :, ::3]
    grad_err = torch.randn(B, K, T, generator=gen)
    return pred.to(device, dtype), noise.to(device, dtype), grad_err.to(device)


def _via_autograd(fn):
    def run(pred, noise, loss, grad_err):
        pred, noise = pred.clone().requires_grad_(), noise.clone().requires_grad_()
        err = fn(pred, noise, loss, DELTA)
        err.backward(grad_err)
        return err, pred.grad, noise.grad

    return run


def _via_launchers(kernels):
    """Forward and backward launchers; grad_noise = -sum_k grad_pred, as the op's autograd forms it."""

    def run(pred, noise, loss, grad_err):
        grad_pred = kernels.dc_error_backward(grad_err, pred, noise, loss, DELTA)
        return kernels.dc_error_forward(pred, noise, loss, DELTA), grad_pred, -grad_pred.sum(1)

    return run


@needs_triton
def test_triton_launches_under_the_device_guard(interpreted_outputs):
    """Both launchers (forward, backward) of every case enter the guard of pred's device."""
    assert interpreted_outputs["guarded"] == ["cpu"] * (2 * (len(interpreted_outputs) - 1))


def _via_saved(outputs, shape, dtype):
    """The child process's launcher outputs for the same (deterministic) inputs."""

    def run(pred, noise, loss, grad_err):
        result = outputs[(shape, loss, str(dtype))]
        if isinstance(result, str):
            pytest.fail(f"the interpreted launchers raised:\n{result}")
        err, grad_pred = result
        return err, grad_pred, -grad_pred.sum(1)

    return run


def _check_against_reference(run, shape, loss, dtype, device):
    pred, noise, grad_err = _inputs(shape, dtype, device)
    err, grad_pred, grad_noise = run(pred, noise, loss, grad_err)

    ref_pred, ref_noise = pred.float().requires_grad_(), noise.float().requires_grad_()
    ref_err = dc_error_reference(ref_pred, ref_noise, loss, DELTA)
    ref_err.backward(grad_err)

    assert err.dtype == torch.float32 and err.shape == shape[:3]
    # errors accumulate in fp32 (or wider) from the same input values, whatever the input dtype
    torch.testing.assert_close(err, ref_err.detach(), rtol=1e-5, atol=1e-6 * ref_err.abs().max().item())
    rtol, atol = GRAD_TOL[dtype]
    for name, got, want in (("pred", grad_pred, ref_pred.grad), ("noise", grad_noise, ref_noise.grad)):
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = want.abs().max().item() or 1.0
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * scale, msg=lambda m: f"grad {name}: {m}")


def _cases(backends, dtypes):
    return [
        pytest.param(backend, loss, dtype, shape, id=f"{backend}-{loss}-{str(dtype)[6:]}-{shape_id}")
        for backend in backends
        for dtype in dtypes
        for loss in LOSSES
        for shape_id, shape in SHAPES.items()
    ]


ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_RUNS = {
    "cpu-op": _via_autograd(lambda *args: torch.ops.dcfast.dc_error(*args)),
    "cpu-public": _via_autograd(dc_error),
}


@pytest.mark.parametrize("backend, loss, dtype, shape", _cases(CPU_RUNS, ALL_DTYPES))
def test_cpu_matches_reference(backend, loss, dtype, shape):
    if backend == "cpu-op" and not _backend.has_kernel("dc_error", "CPU"):
        pytest.skip("dcfast._C not built")
    _check_against_reference(CPU_RUNS[backend], shape, loss, dtype, "cpu")


@needs_triton
@pytest.mark.parametrize("backend, loss, dtype, shape", _cases(["triton-interpret"], INTERPRET_DTYPES))
def test_triton_interpreted_matches_reference(interpreted_outputs, backend, loss, dtype, shape):
    _check_against_reference(_via_saved(interpreted_outputs, shape, dtype), shape, loss, dtype, "cpu")


@needs_cuda
@pytest.mark.parametrize("backend, loss, dtype, shape", _cases(["cuda-op", "cuda-public", "cuda-triton"], ALL_DTYPES))
def test_cuda_matches_reference(backend, loss, dtype, shape):
    if backend == "cuda-op":
        if not _backend.has_kernel("dc_error", "CUDA"):
            pytest.skip("no CUDA kernel registered (neither CUDA C++ built nor triton installed)")
        run = _via_autograd(torch.ops.dcfast.dc_error)
    elif backend == "cuda-public":
        run = _via_autograd(dc_error)
    else:
        if not _backend.triton_available():
            pytest.skip("triton not installed")
        from dcfast.kernels import dc_error as triton_kernels

        run = _via_launchers(triton_kernels)
    _check_against_reference(run, shape, loss, dtype, "cuda")


def test_float64_on_cuda_runs_the_reference(monkeypatch):
    """The CUDA kernels take float32/16 and bfloat16 only: float64 CUDA tensors go to the reference
    even where a CUDA kernel is registered; the C++ CPU kernel keeps float64."""
    face = sys.modules["dcfast.ops.dc_error"]  # the module (dcfast.ops.dc_error is also the function's name)
    monkeypatch.setattr(face, "_has_kernel", lambda device_type: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not face._uses_op(cuda, torch.float64)
    assert all(face._uses_op(cuda, dtype) for dtype in ALL_DTYPES)
    assert face._uses_op(cpu, torch.float64)


@needs_cuda
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_float64_matches_reference(loss):
    pred, noise, grad_err = _inputs((2, 3, 4, 5), torch.float64, "cuda")
    run = _via_autograd(dc_error)
    err, grad_pred, grad_noise = run(pred, noise, loss, grad_err)
    ref_pred, ref_noise = pred.clone().requires_grad_(), noise.clone().requires_grad_()
    ref_err = dc_error_reference(ref_pred, ref_noise, loss, DELTA)
    ref_err.backward(grad_err)
    torch.testing.assert_close(err, ref_err)
    torch.testing.assert_close(grad_pred, ref_pred.grad)
    torch.testing.assert_close(grad_noise, ref_noise.grad)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda-op", "cuda-triton"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[str(d)[6:] for d in ALL_DTYPES])
def test_cuda_unaligned_inputs(backend, dtype):
    """Views that start one element into their storage: no 16-byte alignment, so no 128-bit loads."""
    shape = SHAPES["B2-K3-T2-D64"]
    pred, noise, grad_err = _inputs(shape, dtype, "cuda")
    pred = torch.cat([pred.new_zeros(1), pred.flatten()])[1:].view(shape)
    noise = torch.cat([noise.new_zeros(1), noise.flatten()])[1:].view(noise.shape)
    assert pred.data_ptr() % 16 and noise.data_ptr() % 16
    if backend == "cuda-op":
        run = _via_autograd(torch.ops.dcfast.dc_error)
    else:
        if not _backend.triton_available():
            pytest.skip("triton not installed")
        from dcfast.kernels import dc_error as triton_kernels

        run = _via_launchers(triton_kernels)
    err, grad_pred, _ = run(pred, noise, "huber", grad_err)
    ref_pred = pred.float().requires_grad_()
    ref_err = dc_error_reference(ref_pred, noise.float(), "huber", DELTA)
    ref_err.backward(grad_err)
    torch.testing.assert_close(err, ref_err.detach(), rtol=1e-5, atol=1e-6 * ref_err.abs().max().item())
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad_pred.float(), ref_pred.grad, rtol=rtol, atol=atol * ref_pred.grad.abs().max().item())


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_float64(loss):
    """Analytic gradients (computed in float64) against finite differences of the float32 errors:
    eps = 1e-3 keeps float32 rounding below atol, and every |d| stays more than eps away from the
    kinks at 0 and +-huber_delta, so the loss is exactly quadratic or linear around every point and
    central differences are exact."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 2, 3, dtype=torch.float64, generator=gen)
    pick = torch.randint(0, 4, (2, 3, 2, 3), generator=gen)
    magnitude = torch.tensor([0.2, 0.3, 0.8, 1.5], dtype=torch.float64)[pick]
    sign = torch.randint(0, 2, pick.shape, generator=gen) * 2 - 1
    pred = (noise[:, None] - magnitude * sign).requires_grad_()
    noise.requires_grad_()
    fn = lambda p, n: dc_error(p, n, loss, DELTA)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred, noise), eps=1e-3, atol=1e-4, rtol=1e-3)


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
def test_opcheck(loss, device):
    """Schema, fake (meta) impls, autograd registration and AOT dispatch of both ops."""
    pred, noise, grad_err = _inputs((2, 3, 4, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.dcfast.dc_error_backward.default, (grad_err, pred, noise, loss, DELTA))
    pred.requires_grad_(), noise.requires_grad_()
    torch.library.opcheck(torch.ops.dcfast.dc_error.default, (pred, noise, loss, DELTA))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The public function compiles without graph breaks; values and both gradients match eager."""
    pred, noise, _ = _inputs((2, 3, 4, 5), torch.float32, device)

    def objective(p, n):  # a DC-style use: a softmax over concepts of the negated errors
        return torch.log_softmax(-dc_error(p, n, "huber", DELTA).mean(-1), dim=-1)[:, 0].sum()

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (objective, compiled):
        p, n = pred.clone().requires_grad_(), noise.clone().requires_grad_()
        value = fn(p, n)
        value.backward()
        results.append((value.detach(), p.grad, n.grad))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


BAD_INPUTS = {  # id: (pred shape, noise shape, noise dtype, loss, exception, words the message must contain)
    "pred-3d": ((2, 3, 4), (2, 3, 4), torch.float32, "l2", ValueError, ["pred", "(B, K, T, D)"]),
    "noise-4d": ((2, 3, 4, 5), (2, 1, 4, 5), torch.float32, "l2", ValueError, ["noise", "(B, T, D)"]),
    "noise-T-mismatch": ((2, 3, 4, 5), (2, 3, 5), torch.float32, "l2", ValueError, ["noise", "(2, 3, 5)"]),
    "noise-B-mismatch": ((2, 3, 4, 5), (1, 4, 5), torch.float32, "l2", ValueError, ["noise", "(1, 4, 5)"]),
    "dtype-mismatch": ((2, 3, 4, 5), (2, 4, 5), torch.float16, "l2", TypeError, ["pred", "noise"]),
    "unknown-loss": ((2, 3, 4, 5), (2, 4, 5), torch.float32, "l3", ValueError, ["loss", "l3"]),
}


def _entry(name, op="dc_error"):
    """The checks run before any kernel launch, so the Triton launchers are called on CPU tensors directly."""
    if name == "public":
        return dc_error
    if name == "cpu-op":
        return getattr(torch.ops.dcfast, op)
    from dcfast.kernels import dc_error as triton_kernels

    return getattr(triton_kernels, {"dc_error": "dc_error_forward"}.get(op, op))


ENTRIES = [pytest.param("cpu-op", marks=needs_cpu_kernel), pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("entry", ["public", *ENTRIES])
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises(entry, case):
    pred_shape, noise_shape, noise_dtype, loss, exception, words = case
    fn = _entry(entry)
    pred, noise = torch.randn(pred_shape), torch.randn(noise_shape, dtype=noise_dtype)
    message = _raised(exception, fn, pred, noise, loss, DELTA)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("entry", ENTRIES)
def test_backward_bad_grad_err_raises(entry):
    pred, noise, _ = _inputs((2, 3, 4, 5), torch.float32, "cpu")
    fn = _entry(entry, "dc_error_backward")
    message = _raised(ValueError, fn, torch.randn(2, 3, 5), pred, noise, "l2", DELTA)
    assert "grad_err" in message and "(2, 3, 4)" in message and "(2, 3, 5)" in message


def test_public_rejects_nonpositive_huber_delta():
    pred, noise, _ = _inputs((1, 1, 1, 3), torch.float32, "cpu")
    assert "huber_delta" in _raised(ValueError, dc_error, pred, noise, "huber", 0.0)


def _raised(exception, fn, *args):
    """The message of the expected exception, with C++ sizes [2, 3] written like Python's (2, 3)."""
    with pytest.raises(exception) as info:
        fn(*args)
    return str(info.value).replace("[", "(").replace("]", ")")
