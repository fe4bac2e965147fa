"""dcfast::fisher_accumulate_: every backend against a float64 loop over samples, odd shapes and
dtypes, in-place accumulation, opcheck, a torch.compile smoke test, and the errors raised on bad input.

Backends: on CPU the C++ kernel (`torch.ops`, one thread and several), the public
`dcfast.ops.fisher_accumulate_`, the bmm path, the plain-torch reference, and the Triton launcher
under TRITON_INTERPRET=1 (fp32/fp16; every plan: direct, sample groups, row splits; several slab
sizes); on CUDA (skipped without a GPU) `torch.ops` (CUDA C++ when built, else Triton), the public
function, the bmm path and the Triton launcher, on shapes that reach each plan of the CUDA kernels.
Every path repeats bit for bit (no atomics).
"""
import os
import subprocess
import sys

import pytest
import torch

from dcfast import _backend
from dcfast.ops import fisher_accumulate_, fisher_accumulate_reference
from dcfast.ops.fisher import BMM_MAX_FLOATS, fisher_accumulate_bmm_, uses_bmm

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
    # Products of exactly representable inputs, summed in float32 over R rows: rounding grows like
    # sqrt(R) eps (a random walk) and doubles in the square. Relative to each entry and the largest one.
    rtol = max(1e-5, 4 * 1.2e-7 * grad_output.shape[1] ** 0.5)
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=1e-6 * want.abs().max().item())


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


CPU_RUNS = {"cpu-op": _op, "cpu-op-1thread": _op_one_thread, "cpu-public": fisher_accumulate_,
            "cpu-bmm": fisher_accumulate_bmm_}


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


def test_bmm_route_takes_lora_shapes_on_cuda_only():
    """On CUDA the public op sends a layer to one batched GEMM when its per-sample gradients are no larger
    than its rows (SD 1.5 LoRA factors: N=16, R=4096 tokens, d in {320, 1280}, r in {4, 64}); large
    layers with few rows keep the fused kernel, and CPU always does."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for d in (320, 1280):
        for r in (4, 64):
            assert uses_bmm(cuda, 16, 4096, r, d) and uses_bmm(cuda, 16, 4096, d, r)
            assert not uses_bmm(cpu, 16, 4096, r, d)
    assert not uses_bmm(cuda, 16, 8, 1280, 1280)  # per-sample gradients 80x larger than their rows
    assert not uses_bmm(cuda, 4096, 4096, 320, 320)  # over BMM_MAX_FLOATS
    assert 16 * 64 * 1280 <= BMM_MAX_FLOATS


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_repeats_bit_for_bit_under_deterministic_algorithms(dtype):
    """Several threads on CPU, each on its own chunk of samples, summed in chunk order: the same bits every run."""
    fisher, grad_output, inp = _inputs(SHAPES["N9-R300-O48-I40"], dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        results = [fisher_accumulate_(fisher.clone(), grad_output, inp) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])
    _assert_matches(results[0], fisher, grad_output, inp)


# The Triton interpreter must be on before triton is first imported, so the interpreted launcher runs
# in a child process on inputs saved by this one; the comparison happens here, case by case. The child
# also records the device of every launch's guard (kernels.device_guard).
_INTERPRET_CHILD = """
import sys, traceback, torch
from dcfast.kernels import fisher as kernels
guarded, guard = [], kernels.device_guard
kernels.device_guard = lambda t: guarded.append(str(t.device)) or guard(t)
out = {}
for key, (fisher, grad_output, inp, groups, splits, block_r) in torch.load(sys.argv[1]).items():
    try:
        kernels.fisher_accumulate_(fisher, grad_output, inp, groups=groups, splits=splits, block_r=block_r)
        out[key] = fisher
    except Exception:
        out[key] = traceback.format_exc()
out["guarded"] = guarded
torch.save(out, sys.argv[2])
"""
# (sample groups, row splits, slab rows): one program per tile, samples grouped over programs, every
# sample's rows split over programs (groups = N, squared after the in-order sum over splits).
PLANS = {"direct": (1, 1, None), "groups3": (3, 1, None), "rows3": (None, 3, None)}
SLABS = {"rows2-slab16": (None, 2, 16), "groups2-slab64": (2, 1, 64)}  # slab sizes other than the default 32


@pytest.fixture(scope="module")
def interpreted_outputs(tmp_path_factory):
    """{(shape, dtype, plan, transposed): fisher after the launcher, or a traceback}, under TRITON_INTERPRET=1."""
    folder = tmp_path_factory.mktemp("triton_interpret")
    cases = {}
    for shape in SHAPES.values():
        for dtype in INTERPRET_DTYPES:
            for plan, (groups, splits, block_r) in PLANS.items():
                cases[(shape, str(dtype), plan, False)] = (*_inputs(shape, dtype), groups or shape[0], splits, block_r)
    for plan, (groups, splits, block_r) in SLABS.items():
        shape = SHAPES["N4-R40-O4-I33"]
        cases[(shape, "torch.float32", plan, False)] = (*_inputs(shape, torch.float32), groups or 4, splits, block_r)
    cases[((3, 6, 5, 7), "torch.float32", "rows3", True)] = (*_inputs((3, 6, 5, 7), torch.float32, transposed=True), 3, 3, None)
    torch.save(cases, folder / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    child = subprocess.run([sys.executable, "-c", _INTERPRET_CHILD, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return torch.load(folder / "outputs.pt")


def _saved(outputs, key):
    result = outputs[key]
    if isinstance(result, str):
        pytest.fail(f"the interpreted launcher raised:\n{result}")
    return result


@needs_triton
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("backend, dtype, shape", _cases(INTERPRET_DTYPES, ["triton-interpret"]))
def test_triton_interpreted_matches_loop(interpreted_outputs, backend, dtype, shape, plan):
    fisher, grad_output, inp = _inputs(shape, dtype)
    _assert_matches(_saved(interpreted_outputs, (shape, str(dtype), plan, False)), fisher, grad_output, inp)


@needs_triton
@pytest.mark.parametrize("plan", SLABS)
def test_triton_interpreted_slab_sizes(interpreted_outputs, plan):
    shape = SHAPES["N4-R40-O4-I33"]
    fisher, grad_output, inp = _inputs(shape, torch.float32)
    _assert_matches(_saved(interpreted_outputs, (shape, "torch.float32", plan, False)), fisher, grad_output, inp)


@needs_triton
def test_triton_interpreted_noncontiguous(interpreted_outputs):
    fisher, grad_output, inp = _inputs((3, 6, 5, 7), torch.float32, transposed=True)
    _assert_matches(_saved(interpreted_outputs, ((3, 6, 5, 7), "torch.float32", "rows3", True)), fisher, grad_output, inp)


@needs_triton
def test_triton_launches_under_the_device_guard(interpreted_outputs):
    """Every launch (all but the empty N2-R0 cases, which return early) enters the guard of fisher's device."""
    launched = sum(1 for key in interpreted_outputs if key != "guarded" and key[0][1] != 0)
    assert interpreted_outputs["guarded"] == ["cpu"] * launched


@needs_triton
def test_triton_plan():
    """Sample groups and row splits: enough programs for the device, one sample per program whenever rows
    are split (squares come after the sum over splits), the workspace under its cap."""
    from dcfast.kernels.fisher import MAX_WORKSPACE, plan

    programs = 4 * 132  # an H100/H200
    assert plan(16, 4096, 2048, 2048, programs) == (1, 1)  # 1024 tiles of 64x64: direct
    assert plan(16, 4096, 1280, 1280, programs) == (2, 1)  # 400 tiles: two sample groups
    groups, splits = plan(16, 4096, 4, 320, programs)  # LoRA A at d=320, r=4: 5 tiles
    assert (groups, splits) == (16, 7) and groups * splits * 5 >= programs
    assert plan(16, 20, 4, 320, programs) == (16, 2)  # a split holds at least 16 rows
    for shape in [(16, 4096, r, d) for r in (4, 16, 64) for d in (320, 640, 1280)] + [(16, 64, 1024, 1024)]:
        for programs in (8, 528, 10**6):
            groups, splits = plan(*shape, programs)
            assert 1 <= groups <= shape[0] and splits >= 1 and (splits == 1 or groups == shape[0]), (shape, programs)
            assert groups * splits * shape[2] * shape[3] <= max(MAX_WORKSPACE, shape[2] * shape[3]), (shape, programs)


# Shapes that reach each plan of the CUDA kernels on an H100/H200 (4 x 132 programs wanted): direct
# (576 tiles of 64x64), sample groups (100 tiles, 8 samples), row splits (SD 1.5 LoRA factors).
CUDA_PLAN_SHAPES = {
    "direct-N2-R3-O1536-I1536": (2, 3, 1536, 1536),
    "groups-N8-R5-O640-I640": (8, 5, 640, 640),
    "rows-N16-R4096-O4-I320": (16, 4096, 4, 320),
    "rows-N16-R4096-O320-I4": (16, 4096, 320, 4),
    "rows-N3-R1000-O64-I1280": (3, 1000, 64, 1280),
}
CUDA_BACKENDS = ["cuda-op", "cuda-public", "cuda-bmm", "cuda-triton"]


def _cuda_run(backend):
    if backend == "cuda-op":
        if not _backend.has_kernel("fisher_accumulate_", "CUDA"):
            pytest.skip("no CUDA kernel registered (neither CUDA C++ built nor triton installed)")
        return _op
    if backend == "cuda-public":
        return fisher_accumulate_
    if backend == "cuda-bmm":
        return fisher_accumulate_bmm_
    if not _backend.triton_available():
        pytest.skip("triton not installed")
    from dcfast.kernels import fisher as triton_kernels

    if backend == "cuda-triton-autotuned":
        return triton_kernels.fisher_accumulate_
    # A fixed slab: autotuning compiles four configs per new (shape, dtype) key, minutes over this table.
    return lambda f, g, x: triton_kernels.fisher_accumulate_(f, g, x, block_r=32)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_cuda_triton_autotuned(dtype):
    """The autotuned launch (the default on CUDA) on an SD 1.5 LoRA factor: tuning re-runs the kernel,
    which must only store into its workspace (a second add into fisher would double it)."""
    shape = CUDA_PLAN_SHAPES["rows-N16-R4096-O4-I320"]
    fisher, grad_output, inp = _inputs(shape, dtype, "cuda")
    got = fisher.clone()
    _cuda_run("cuda-triton-autotuned")(got, grad_output, inp)
    _assert_matches(got, fisher, grad_output, inp)


@needs_cuda
@pytest.mark.parametrize("backend, dtype, shape", _cases(DTYPES, CUDA_BACKENDS) + [
    pytest.param(b, d, s, id=f"{b}-{str(d)[6:]}-{k}") for b in CUDA_BACKENDS for d in DTYPES
    for k, s in CUDA_PLAN_SHAPES.items()])
def test_cuda_matches_loop(backend, dtype, shape):
    run = _cuda_run(backend)
    fisher, grad_output, inp = _inputs(shape, dtype, "cuda")
    got = fisher.clone()
    run(got, grad_output, inp)
    _assert_matches(got, fisher, grad_output, inp)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", ["rows-N16-R4096-O4-I320", "groups-N8-R5-O640-I640"])
@pytest.mark.parametrize("backend", ["cuda-op", "cuda-public", "cuda-triton"])
def test_cuda_repeats_bit_for_bit(backend, shape, dtype):
    """Split plans sum their partials in a fixed order: five runs, the same bits."""
    run = _cuda_run(backend)
    fisher, grad_output, inp = _inputs(CUDA_PLAN_SHAPES[shape], dtype, "cuda")
    results = []
    for _ in range(5):
        got = fisher.clone()
        run(got, grad_output, inp)
        results.append(got)
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_cuda
@needs_triton
def test_cuda_triton_tf32_follows_torch():
    """float32 inputs use TF32 tensor cores exactly when torch's CUDA matmuls do."""
    from dcfast.kernels import fisher as triton_kernels

    fisher, grad_output, inp = _inputs(CUDA_PLAN_SHAPES["rows-N3-R1000-O64-I1280"], torch.float32, "cuda")
    results = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            results[tf32] = fisher.clone()
            triton_kernels.fisher_accumulate_(results[tf32], grad_output, inp)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    _assert_matches(results[False], fisher, grad_output, inp)
    want = _expected(fisher, grad_output, inp)
    torch.testing.assert_close(results[True].double().cpu(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert not torch.equal(results[True], results[False])  # TF32 rounding shows: the switch took effect


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
