"""dcfast::fisher_accumulate_: every backend against a float64 loop over samples, odd shapes and
dtypes, in-place accumulation, opcheck, a torch.compile smoke test, and the errors raised on bad input.

Backends: on CPU the C++ kernel (`torch.ops`, one thread and several), the public
`dcfast.ops.fisher_accumulate_`, the plain-torch reference, and the Triton launcher under
TRITON_INTERPRET=1 (fp32/fp16, one and several sample splits); on CUDA (skipped without a GPU)
`torch.ops` (CUDA C++ when built, else Triton), the public function and the Triton launcher.
"""
import os
import subprocess
import sys

import pytest
import torch

from dcfast import _backend
from dcfast.ops import fisher_accumulate_, fisher_accumulate_reference

SHAPES = {  # (N, R, O, I)
    "N1-R1-O1-I1": (1, 1, 1, 1),
    "N3-R5-O7-I9": (3, 5, 7, 9),
    "N4-R40-O4-I33": (4, 40, 4, 33),  # LoRA A: O = rank; R spans two Triton row slabs (32)
    "N5-R17-O70-I4": (5, 17, 70, 4),  # LoRA B: I = rank; O spans two Triton tiles (64)
    "N7-R3-O65-I66": (7, 3, 65, 66),
    "N2-R0-O3-I4": (2, 0, 3, 4),  # no rows: nothing to add
    "N9-R300-O48-I40": (9, 300, 48, 40),  # 5M multiply-adds: the C++ kernel splits samples over threads
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET_DTYPES = (torch.float32, torch.float16)  # the interpreter computes bfloat16 wrongly

needs_cpu_kernel = pytest.mark.skipif(not _backend.has_kernel("fisher_accumulate_", "CPU"), reason="dcfast._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton not installed")


def _inputs(shape, dtype, device="cpu", transposed=False):
    """fisher (a nonzero start, to see that the op adds), grad_output, input; `transposed` gives
    input as a non-contiguous view."""
    N, R, O, I = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    fisher = torch.rand(O, I, generator=gen)
    grad_output = torch.randn(N, R, O, generator=gen)
    inp = torch.randn(N, I, R, generator=gen).transpose(1, 2) if transposed else torch.randn(N, R, I, generator=gen)
    return fisher.to(device), grad_output.to(device, dtype), inp.to(device, dtype)


def _expected(fisher, grad_output, inp):
    """fisher + sum_n (G_n^T X_n)^2 by a loop over samples in float64, from the (rounded) input values."""
    out = fisher.double().cpu().clone()
    for g, x in zip(grad_output.double().cpu(), inp.double().cpu()):
        out += (g.t() @ x) ** 2
    return out


def _assert_matches(got, fisher, grad_output, inp):
    want = _expected(fisher, grad_output, inp)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # products of exactly representable inputs, summed in float32: relative to the largest entry
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _cases(dtypes, backends):
    return [pytest.param(b, d, s, id=f"{b}-{str(d)[6:]}-{k}") for b in backends for d in dtypes for k, s in SHAPES.items()]


def _op(fisher, grad_output, inp):
    torch.ops.dcfast.fisher_accumulate_(fisher, grad_output, inp)


def _op_one_thread(fisher, grad_output, inp):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one chunk of samples, summed straight into fisher
    try:
        _op(fisher, grad_output, inp)
    finally:
        torch.set_num_threads(threads)


CPU_RUNS = {"cpu-op": _op, "cpu-op-1thread": _op_one_thread, "cpu-public": fisher_accumulate_}


@pytest.mark.parametrize("backend, dtype, shape", _cases(DTYPES, CPU_RUNS))
def test_cpu_matches_loop(backend, dtype, shape):
    if backend.startswith("cpu-op") and not _backend.has_kernel("fisher_accumulate_", "CPU"):
        pytest.skip("dcfast._C not built")
    fisher, grad_output, inp = _inputs(shape, dtype)
    got = fisher.clone()
    CPU_RUNS[backend](got, grad_output, inp)
    _assert_matches(got, fisher, grad_output, inp)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_reference_matches_loop(shape):
    fisher, grad_output, inp = _inputs(shape, torch.float32)
    _assert_matches(fisher_accumulate_reference(fisher, grad_output, inp), fisher, grad_output, inp)


@pytest.mark.parametrize("entry", [pytest.param("cpu-op", marks=needs_cpu_kernel), "cpu-public"])
def test_noncontiguous_input(entry):
    fisher, grad_output, inp = _inputs((3, 6, 5, 7), torch.float32, transposed=True)
    assert not inp.is_contiguous()
    got = fisher.clone()
    (_op if entry == "cpu-op" else fisher_accumulate_)(got, grad_output, inp)
    _assert_matches(got, fisher, grad_output, inp)


def test_public_float64_and_return_value():
    fisher, grad_output, inp = _inputs((3, 5, 7, 9), torch.float64)
    got = fisher.clone()
    assert fisher_accumulate_(got, grad_output, inp) is got
    torch.testing.assert_close(got.double(), _expected(fisher, grad_output, inp), rtol=1e-7, atol=0)


# The Triton interpreter must be on before triton is first imported, so the interpreted launcher runs
# in a child process on inputs saved by this one; the comparison happens here, case by case.
_INTERPRET_CHILD = """
import sys, traceback, torch
from dcfast.kernels import fisher as kernels
out = {}
for key, (fisher, grad_output, inp, splits) in torch.load(sys.argv[1]).items():
    try:
        kernels.fisher_accumulate_(fisher, grad_output, inp, splits=splits)
        out[key] = fisher
    except Exception:
        out[key] = traceback.format_exc()
torch.save(out, sys.argv[2])
"""
SPLITS = (1, 3)  # one program per tile (plain store) and samples split over programs (atomic_add)


@pytest.fixture(scope="module")
def interpreted_outputs(tmp_path_factory):
    """{(shape, dtype, splits, transposed): fisher after the launcher, or a traceback}, under TRITON_INTERPRET=1."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases = {}
    for shape in SHAPES.values():
        for dtype in INTERPRET_DTYPES:
            for splits in SPLITS:
                cases[(shape, str(dtype), splits, False)] = (*_inputs(shape, dtype), splits)
    cases[((3, 6, 5, 7), "torch.float32", 2, True)] = (*_inputs((3, 6, 5, 7), torch.float32, transposed=True), 2)
    torch.save(cases, folder / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run([sys.executable, "-c", _INTERPRET_CHILD, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    return torch.load(folder / "outputs.pt")


def _saved(outputs, key):
    result = outputs[key]
    if isinstance(result, str):
        pytest.fail(f"the interpreted launcher raised:\n{result}")
    return result


@needs_triton
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("backend, dtype, shape", _cases(INTERPRET_DTYPES, ["triton-interpret"]))
def test_triton_interpreted_matches_loop(interpreted_outputs, backend, dtype, shape, splits):
    fisher, grad_output, inp = _inputs(shape, dtype)
    _assert_matches(_saved(interpreted_outputs, (shape, str(dtype), splits, False)), fisher, grad_output, inp)


@needs_triton
def test_triton_interpreted_noncontiguous(interpreted_outputs):
    fisher, grad_output, inp = _inputs((3, 6, 5, 7), torch.float32, transposed=True)
    _assert_matches(_saved(interpreted_outputs, ((3, 6, 5, 7), "torch.float32", 2, True)), fisher, grad_output, inp)


@needs_cuda
@pytest.mark.parametrize("backend, dtype, shape", _cases(DTYPES, ["cuda-op", "cuda-public", "cuda-triton"]))
def test_cuda_matches_loop(backend, dtype, shape):
    if backend == "cuda-op":
        if not _backend.has_kernel("fisher_accumulate_", "CUDA"):
            pytest.skip("no CUDA kernel registered (neither CUDA C++ built nor triton installed)")
        run = _op
    elif backend == "cuda-public":
        run = fisher_accumulate_
    else:
        if not _backend.triton_available():
            pytest.skip("triton not installed")
        from dcfast.kernels import fisher as triton_kernels

        run = triton_kernels.fisher_accumulate_
    fisher, grad_output, inp = _inputs(shape, dtype, "cuda")
    got = fisher.clone()
    run(got, grad_output, inp)
    _assert_matches(got, fisher, grad_output, inp)


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@needs_cpu_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(device, dtype):
    """Schema (mutates fisher only), fake impl and AOT dispatch of the mutating op."""
    fisher, grad_output, inp = _inputs((3, 5, 7, 9), dtype, device)
    torch.library.opcheck(torch.ops.dcfast.fisher_accumulate_.default, (fisher, grad_output, inp))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The public function compiles without graph breaks and mutates its buffer like eager."""
    fisher, grad_output, inp = _inputs((3, 5, 7, 9), torch.float32, device)

    def step(f, g, x):
        fisher_accumulate_(f, g * 2.0, x)
        return f.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_f, compiled_f = fisher.clone(), fisher.clone()
    torch.testing.assert_close(compiled(compiled_f, grad_output, inp), step(eager_f, grad_output, inp))
    torch.testing.assert_close(compiled_f, eager_f)


BAD_INPUTS = {  # id: (fisher, grad_output, input, exception, words the message must contain)
    "grad-2d": ((3, 4), (2, 3), (2, 5, 4), ValueError, ["grad_output", "(N, R, O)", "(2, 3)"]),
    "rows-mismatch": ((3, 4), (2, 5, 3), (2, 6, 4), ValueError, ["grad_output", "input", "(2, 5, 3)", "(2, 6, 4)"]),
    "fisher-shape": ((3, 5), (2, 5, 3), (2, 5, 4), ValueError, ["fisher", "(3, 4)", "(3, 5)"]),
    "fisher-dtype": ((3, 4, torch.float64), (2, 5, 3), (2, 5, 4), TypeError, ["fisher", "float32"]),
    "dtype-mismatch": ((3, 4), (2, 5, 3, torch.float16), (2, 5, 4), TypeError, ["grad_output", "input"]),
}


def _tensor(spec):
    *shape, dtype = spec if isinstance(spec[-1], torch.dtype) else (*spec, torch.float32)
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("entry", ["public", pytest.param("cpu-op", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises(entry, case):
    *specs, exception, words = case
    fn = fisher_accumulate_ if entry == "public" else _op
    with pytest.raises(exception) as info:
        fn(*(_tensor(s) for s in specs))
    message = str(info.value).replace("[", "(").replace("]", ")")  # C++ sizes [2, 3] read like Python's (2, 3)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_public_rejects_noncontiguous_fisher_and_integer_inputs():
    with pytest.raises(ValueError, match="contiguous"):
        fisher_accumulate_(torch.zeros(4, 3).t(), torch.zeros(2, 5, 3), torch.zeros(2, 5, 4))
    with pytest.raises(TypeError, match="int64"):
        fisher_accumulate_(torch.zeros(3, 4), torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, 4, dtype=torch.long))
