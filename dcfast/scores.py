"""The DC score engine (DESIGN 1, 2.1-2.2): all B*K*T U-Net evaluations of a batch in one chunked pass.

For images x0 (B, C, H, W), concept conditions cond (K, L, D) and T (timestep, noise) pairs shared by
every concept,

    x_t[b,j]   = sqrt(abar[t_j]) x0[b] + sqrt(1 - abar[t_j]) eps[b,j]
    err[b,k,j] = mean_{C,H,W} loss(target[b,j] - model_theta(x_t[b,j], cond[k], t_j))

The target is the scheduler's `prediction_type`: eps[b,j] for "epsilon", the velocity
v[b,j] = sqrt(abar[t_j]) eps[b,j] - sqrt(1 - abar[t_j]) x0[b] for "v_prediction" (computed once per
(b, j), never per concept); "sample" models are refused.

The U-Net sees rows ordered (b, k, j), image-major, so a module hook sees each image's K*T rows
together (what dcfast.FisherAccumulator relies on). The target is never repeated K times: the fused
`dc_error` op reads it in place.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

from dcfast.ops.dc_error import LOSSES, dc_error
from dcfast.unet_pass import SHARES, Layout, forward_rows, usable_shares

PREDICTION_TYPES = ("epsilon", "v_prediction")

# The exact work shared across concepts by default (dcfast.unet_pass), each kept where it paid on the 2-core CPU
# (benchmarks/RESULTS.md): "prefix" and "kv" did at every size; "temb" (0.03% of the tiny U-Net's FLOPs) measured
# within the noise, so it is available (share=...) but not on by default.
DEFAULT_SHARES = frozenset({"prefix", "kv"})


@dataclass
class DCInputs:
    """Validated engine inputs: images, and the noise, timestep and abar of every (image, j) pair."""

    x0: torch.Tensor  # (B, C, H, W)
    noise: torch.Tensor  # (B, T, C, H, W), possibly an expanded view
    timesteps: torch.Tensor  # (B, T) long
    abar: torch.Tensor  # (B, T) alphas_cumprod[timesteps] in x0's dtype
    prediction: str = "epsilon"  # the scheduler's prediction_type, one of PREDICTION_TYPES

    def x_t(self, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Noised inputs of rows (b, j): sqrt(abar) x0[b] + sqrt(1 - abar) eps[b, j]."""
        abar = self.abar[b, j].view(-1, 1, 1, 1)
        return abar.sqrt() * self.x0[b] + (1 - abar).sqrt() * self.noise[b, j]

    @property
    def shape(self) -> Tuple[int, int]:
        return self.noise.shape[0], self.noise.shape[1]


def default_timesteps(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """Diffusion Classifier's evenly strided timesteps: range(N//T//2, N, N//T), T of them."""
    if not 0 < num_timesteps <= num_train_timesteps:
        raise ValueError(f"num_timesteps must be in [1, {num_train_timesteps}], got {num_timesteps}")
    stride = num_train_timesteps // num_timesteps
    return torch.arange(stride // 2, num_train_timesteps, stride)[:num_timesteps]


def prediction_type(scheduler) -> str:
    """The scheduler's `prediction_type` ("epsilon" when its config has none); ValueError for others."""
    config = getattr(scheduler, "config", None)
    kind = (config.get("prediction_type", None) if hasattr(config, "get") else None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported; DC scores and the training losses "
                         f"support {' and '.join(PREDICTION_TYPES)} models (use an epsilon or v-prediction model)")
    return kind


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict at (x0, eps, t): eps, or v = scheduler.get_velocity(x0, eps, t)."""
    if prediction_type(scheduler) == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return noise


def _alphas_cumprod(scheduler) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(alphas, torch.Tensor):
        raise TypeError(
            f"scheduler must have an `alphas_cumprod` tensor (a diffusers DDPM/DDIM-style scheduler); "
            f"{type(scheduler).__name__} has none"
        )
    return alphas


def prepare_inputs(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
                   num_timesteps: int = 8, generator: Optional[torch.Generator] = None) -> DCInputs:
    """Check shapes, dtypes and devices; draw missing timesteps/noise. Shared by every engine."""
    if not isinstance(x0, torch.Tensor) or x0.dim() != 4:
        raise ValueError(f"x0 must be a (B, C, H, W) tensor, got {getattr(x0, 'shape', type(x0))}")
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise ValueError(f"cond must be a (K, L, D) tensor of encoder hidden states, got {getattr(cond, 'shape', type(cond))}")
    B, C, H, W = x0.shape
    K, _, D = cond.shape
    if K == 0 or B == 0:
        raise ValueError(f"need at least one image and one concept, got B={B} images and K={K} concepts")
    config = unet.config
    if C != config.in_channels:
        raise ValueError(f"x0 has {C} channels but the U-Net expects in_channels={config.in_channels}")
    if D != config.cross_attention_dim:
        raise ValueError(f"cond's last dim is {D} but the U-Net's cross_attention_dim is {config.cross_attention_dim}")
    if cond.device != x0.device or cond.dtype != x0.dtype:
        raise ValueError(f"cond ({cond.dtype}, {cond.device}) must match x0 ({x0.dtype}, {x0.device})")
    alphas = _alphas_cumprod(scheduler)
    num_train = alphas.shape[0]

    if timesteps is None:
        timesteps = default_timesteps(num_train, num_timesteps)
    timesteps = torch.as_tensor(timesteps)
    if timesteps.is_floating_point() or timesteps.dim() not in (1, 2):
        raise ValueError(f"timesteps must be an integer (T,) or (B, T) tensor, got {timesteps.dtype} {tuple(timesteps.shape)}")
    if timesteps.dim() == 2 and timesteps.shape[0] != B:
        raise ValueError(f"per-image timesteps must be (B, T) with B={B}, got {tuple(timesteps.shape)}")
    if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= num_train):
        raise ValueError(f"timesteps must lie in [0, {num_train}), got [{timesteps.min()}, {timesteps.max()}]")
    timesteps = timesteps.to(x0.device, torch.long).expand(B, -1) if timesteps.dim() == 1 else timesteps.to(x0.device, torch.long)
    T = timesteps.shape[1]
    if T == 0:
        raise ValueError("need at least one timestep (T >= 1)")

    if noise is None:
        noise = torch.randn((B, T, C, H, W), generator=generator, device=x0.device, dtype=x0.dtype)
    elif not isinstance(noise, torch.Tensor) or noise.shape not in ((B, T, C, H, W), (T, C, H, W)):
        raise ValueError(f"noise must be (B, T, C, H, W) = {(B, T, C, H, W)} or shared (T, C, H, W), "
                         f"got {tuple(getattr(noise, 'shape', ()))}")
    elif noise.dtype != x0.dtype or noise.device != x0.device:
        raise ValueError(f"noise ({noise.dtype}, {noise.device}) must match x0 ({x0.dtype}, {x0.device})")
    noise = noise.expand(B, T, C, H, W)

    abar = alphas.to(x0.device)[timesteps].to(x0.dtype)
    return DCInputs(x0=x0, noise=noise, timesteps=timesteps, abar=abar, prediction=prediction_type(scheduler))


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


# ------------------------------------------------------------------------------------------------------
# Chunks: rectangles of images x concepts x pairs, rows (b, k, j) image-major.
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Rows b in [b0, b1), k in [k0, k1), j in [j0, j1), ordered (b, k, j)."""

    b0: int
    b1: int
    k0: int
    k1: int
    j0: int
    j1: int

    @property
    def layout(self) -> Layout:
        return Layout(self.b1 - self.b0, self.k1 - self.k0, self.j1 - self.j0)

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def index(self):
        return slice(self.b0, self.b1), slice(self.k0, self.k1), slice(self.j0, self.j1)


def full_rows(budget: int, K: int, T: int) -> int:
    """Rows of a chunk the planner cuts for `budget` where nothing truncates it (end of an image or the pass)."""
    if budget >= K * T:
        return budget // (K * T) * K * T
    if budget >= K:
        return min(budget // K, T) * K
    return budget


def plan_chunks(B: int, K: int, T: int, budget: Callable[[], int]) -> Iterator[Chunk]:
    """Cut the B*K*T rows into chunks of at most budget() rows each (asked before every chunk).

    Whole images when the budget holds K*T rows or more, else a run of pairs j of one image with all K
    concepts, else some concepts of one pair. Every image's rows come before the next image's (what a
    Fisher hook needs), and each chunk shares its pairs' prefix over its concepts.
    """
    b = 0
    while b < B:
        rows = budget()
        if rows >= K * T:
            nb = min(rows // (K * T), B - b)
            yield Chunk(b, b + nb, 0, K, 0, T)
            b += nb
            continue
        j = 0
        while j < T:
            if rows >= K:
                nt = min(rows // K, T - j)
                yield Chunk(b, b + 1, 0, K, j, j + nt)
                j += nt
            else:
                k = 0
                while k < K:
                    nk = min(rows, K - k)
                    yield Chunk(b, b + 1, k, k + nk, j, j + 1)
                    k += nk
                    if k < K:
                        rows = budget()
                j += 1
            if j < T:
                rows = budget()  # mid-image: a run of pairs (or concepts) of this image whatever the budget
        b += 1


# ------------------------------------------------------------------------------------------------------
# Chunk size: autotuned once per (U-Net config, row shape, device, dtype, threads), cached in memory.
# ------------------------------------------------------------------------------------------------------

# Candidate row budgets on CPU, tried in ascending order. Below 16 rows per call the tiny U-Net pays per-call
# overhead; above 128 its activations spill the caches (benchmarks/RESULTS.md). Each is timed on one chunk of
# the first call's own inputs, before its real work, at least TUNE_ROUNDS times and TUNE_MIN_SECONDS (the
# first run of a new shape includes oneDNN's primitive set-up: the min discards it); the ascent stops at the
# first budget TUNE_STOP times slower per row than the best so far (per-row time is U-shaped in the chunk
# size), so large rows are not timed at sizes they cannot win. Tuning before, not during, the real work keeps
# every call of a process on one chunk size: results that are bitwise reproducible within the process (a chunk
# size changes the last bit of some errors; pin `max_batch` / `dc_max_batch` for bitwise equality across
# processes).
CPU_CANDIDATES = (16, 32, 64, 128)
TUNE_ROUNDS = 2
TUNE_MIN_SECONDS = 0.05
TUNE_MAX_RUNS = 8
TUNE_STOP = 1.05
CPU_FALLBACK = 32  # where tuning is not possible (module hooks would see the timing runs): the peer's batch


@dataclass
class _Tuning:
    candidates: Tuple[int, ...]  # row budgets, ascending, distinct in their full chunk size
    full: Dict[int, int]  # budget -> rows of its full chunk
    seconds: Dict[int, List[float]]  # budget -> seconds per row of its timing runs
    best: Optional[int] = None

    def record(self, budget: int, rows: int, seconds: float) -> None:
        self.seconds[budget].append(seconds / rows)

    def fastest(self) -> Optional[int]:
        timed = [c for c in self.candidates if self.seconds[c]]
        return min(timed, key=lambda c: min(self.seconds[c])) if timed else None


class ChunkTuner:
    """The engine's chunk sizes by key; `dcfast.scores.chunk_tuner`. `clear()` forgets them (re-tune)."""

    def __init__(self):
        self._states: Dict[tuple, _Tuning] = {}

    def clear(self) -> None:
        self._states.clear()

    def choices(self) -> Dict[tuple, Optional[int]]:
        """key -> chosen row budget (None while still measuring)."""
        return {key: state.best for key, state in self._states.items()}

    def state(self, key: tuple, K: int, T: int, total: int) -> Optional[_Tuning]:
        """The tuning of `key`, made on first use; None when there is nothing to choose (one chunk holds all)."""
        if key not in self._states:
            budgets: Dict[int, int] = {}
            for c in CPU_CANDIDATES:
                full = full_rows(min(c, total), K, T)
                if full not in budgets.values():
                    budgets[min(c, total)] = full
            if len(budgets) < 2:
                return None
            self._states[key] = _Tuning(tuple(budgets), budgets, {c: [] for c in budgets})
        return self._states[key]


chunk_tuner = ChunkTuner()


def _unet_fingerprint(unet) -> tuple:
    config = getattr(unet, "config", None)
    items = repr(sorted(dict(config).items())) if config is not None else ""
    return type(unet).__name__, items, sum(p.numel() for p in unet.parameters())


def _tune(unet, inputs: DCInputs, cond: torch.Tensor, shares: FrozenSet[str], tuning: _Tuning) -> int:
    """Time the candidates, ascending, on the first chunk each cuts from these inputs (results discarded)."""
    B, T = inputs.shape
    K = cond.shape[0]
    for budget in tuning.candidates:
        chunk = next(plan_chunks(B, K, T, lambda: budget))
        spent = 0.0
        while len(tuning.seconds[budget]) < TUNE_ROUNDS or (spent < TUNE_MIN_SECONDS
                                                             and len(tuning.seconds[budget]) < TUNE_MAX_RUNS):
            start = time.perf_counter()
            _chunk_predictions(unet, inputs, cond, chunk, shares)
            elapsed = time.perf_counter() - start
            tuning.record(budget, chunk.rows, elapsed)
            spent += elapsed
        best = tuning.fastest()
        if min(tuning.seconds[budget]) > TUNE_STOP * min(tuning.seconds[best]):
            break
    tuning.best = tuning.fastest()
    return tuning.best


def _chunk_rows(unet, inputs: DCInputs, cond: torch.Tensor, max_batch: Optional[int], shares: FrozenSet[str]) -> int:
    """Row budget of this pass: max_batch when given; on CUDA the whole pass; on CPU the tuned size for this
    (U-Net config, row shape, device, dtype, threads, grad, autocast, shares), tuned on first use."""
    B, T = inputs.shape
    K = cond.shape[0]
    total = B * K * T
    if max_batch is not None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        return max_batch
    device = inputs.x0.device
    if device.type != "cpu":
        return total  # CUDA: the whole pass, halved on out-of-memory
    key = (_unet_fingerprint(unet), tuple(inputs.x0.shape[1:]), tuple(cond.shape[1:]), K, T,
           min(total, max(CPU_CANDIDATES)), tuple(sorted(shares)), str(device), inputs.x0.dtype,
           torch.get_num_threads(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
    tuning = chunk_tuner.state(key, K, T, total)
    if tuning is None:
        return total
    if tuning.best is None:
        if _hooked(unet):  # a hook would see the timing runs (a Fisher track would count them)
            return min(CPU_FALLBACK, total)
        _tune(unet, inputs, cond, shares, tuning)
    return tuning.best


def _hooked(unet) -> bool:
    from dcfast.unet_pass import _global_hooks, _has_hooks

    return _global_hooks() or _has_hooks(unet)


# ------------------------------------------------------------------------------------------------------
# One chunk.
# ------------------------------------------------------------------------------------------------------

def _pair_inputs(inputs: DCInputs, chunk: Chunk) -> Tuple[torch.Tensor, torch.Tensor]:
    """x_t (pairs, C, H, W) and t (pairs,) of the chunk's pairs (b, j), b-major."""
    bs, _, js = chunk.index
    abar = inputs.abar[bs, js]
    scale = abar.view(*abar.shape, 1, 1, 1)
    x_t = scale.sqrt() * inputs.x0[bs].unsqueeze(1) + (1 - scale).sqrt() * inputs.noise[bs, js]
    return x_t.reshape(-1, *inputs.x0.shape[1:]), inputs.timesteps[bs, js].reshape(-1)


def _pair_target(inputs: DCInputs, chunk: Chunk) -> torch.Tensor:
    """(nb, nt, C*H*W) what the model predicts at the chunk's pairs: the noise, or the velocity."""
    bs, _, js = chunk.index
    noise = inputs.noise[bs, js]
    if inputs.prediction == "epsilon":
        return noise.reshape(noise.shape[0], noise.shape[1], -1)
    abar = inputs.abar[bs, js]
    scale = abar.view(*abar.shape, 1, 1, 1)
    target = scale.sqrt() * noise - (1 - scale).sqrt() * inputs.x0[bs].unsqueeze(1)
    return target.reshape(target.shape[0], target.shape[1], -1)


def _chunk_predictions(unet, inputs: DCInputs, cond: torch.Tensor, chunk: Chunk, shares: FrozenSet[str]) -> torch.Tensor:
    """The chunk's U-Net outputs as (nb, nk, nt, C*H*W) in the noise's dtype."""
    x_pairs, t_pairs = _pair_inputs(inputs, chunk)
    layout = chunk.layout
    out = forward_rows(unet, x_pairs, t_pairs, cond[chunk.k0:chunk.k1], layout, shares)
    return _as_rows(out, inputs.noise.dtype).view(layout.nb, layout.nk, layout.nt, -1)


def _as_rows(out: torch.Tensor, dtype: torch.dtype, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """U-Net output (rows, C, H, W) as contiguous (rows, C*H*W) rows in `dtype`, with at most one copy.

    Under autocast the U-Net returns bf16/fp16 while the noise is fp32, and a channels_last U-Net returns
    channels_last tensors (no `.view` of those): one `copy_` converts dtype and layout together. No copy
    at all when the output is already contiguous in `dtype`. Differentiable (copy_ records the graph).
    """
    rows = out.shape[0]
    if into is None:
        if out.dtype == dtype and out.is_contiguous():
            return out.view(rows, -1)
        into = torch.empty((rows, out[0].numel()), device=out.device, dtype=dtype)
    into.view(out.shape).copy_(out)
    return into


def _with_oom_retry(run: Callable[[int], torch.Tensor], max_batch: int, explicit: bool) -> torch.Tensor:
    """Run with chunks of max_batch rows; when the size was not given, halve it on CUDA OOM."""
    while True:
        try:
            return run(max_batch)
        except torch.OutOfMemoryError:
            if explicit or max_batch == 1:
                raise
            max_batch //= 2
            torch.cuda.empty_cache()


def _requested(share) -> FrozenSet[str]:
    if share is None:
        return DEFAULT_SHARES
    if isinstance(share, str):
        share = (share,)
    return frozenset(share)


def dc_scores(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, *, timesteps=None, noise=None,
              num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
              max_batch: Optional[int] = None, huber_delta: float = 1.0, share=None) -> torch.Tensor:
    """DC errors err (B, K, T) of every image under every concept, in one chunked batched U-Net pass.

    Args:
        unet: a diffusers UNet2DConditionModel (peft-LoRA-wrapped or not).
        scheduler: any scheduler with `alphas_cumprod` (DDPM, DDIM, ...).
        x0: (B, C, H, W) clean latents (or pixels for a VAE-less model).
        cond: (K, L, D) encoder hidden states, one per concept.
        timesteps: (T,) shared by all images or (B, T); default: T=num_timesteps evenly strided.
        noise: (B, T, C, H, W) or (T, C, H, W) shared by all images; default: drawn from `generator`.
        loss: 'l2' (default), 'l1' or 'huber' (with `huber_delta`).
        max_batch: U-Net rows per call (the override); default on CPU: autotuned once per U-Net config,
            row shape, device, dtype and thread count (`chunk_tuner`); on CUDA the whole pass (halved on OOM).
        share: exact work done once instead of once per concept, a subset of ("prefix", "kv", "temb")
            (`dcfast.unet_pass`); None: DEFAULT_SHARES; (): the plain U-Net call on every row.

    Differentiable when grad is enabled (the graph spans all chunks; see `dc_loss_backward` for the
    memory-bounded gradient).
    """
    _check_loss(loss)
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    return _errors(unet, inputs, cond, loss, max_batch, huber_delta, share)


def dc_scores_with_predictions(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, concepts: Sequence[int] = (0,),
                               *, timesteps=None, noise=None, num_timesteps: int = 8,
                               generator: Optional[torch.Generator] = None, loss: str = "l2",
                               max_batch: Optional[int] = None, huber_delta: float = 1.0,
                               share=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`dc_scores` plus the pass's own U-Net outputs under `concepts` (indices into cond), no extra U-Net call.

    Returns (err (B, K, T), predictions (B, len(concepts), T, C, H, W) in the noise's dtype): predictions[b, i, j]
    is the model's output at (x_t[b, j], cond[concepts[i]], t[b, j]), what a separate call on those rows gives.
    Differentiable like `dc_scores` (EWC-DC's denoising loss and DSC's noise distillation read them).
    """
    _check_loss(loss)
    inputs = prepare_inputs(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    concepts = [int(k) for k in concepts]
    if any(not 0 <= k < cond.shape[0] for k in concepts):
        raise ValueError(f"concepts must index cond's {cond.shape[0]} conditions, got {concepts}")
    err, kept = _errors(unet, inputs, cond, loss, max_batch, huber_delta, share, keep=concepts)
    B, T = inputs.shape
    return err, kept.view(B, len(concepts), T, *x0.shape[1:])


def _errors(unet, inputs: DCInputs, cond: torch.Tensor, loss: str, max_batch: Optional[int],
            huber_delta: float, share=None, keep: Sequence[int] = ()):
    """err (B, K, T); with `keep`, (err, the predictions of those concepts (B, len(keep), T, C*H*W))."""
    B, T = inputs.shape
    K = cond.shape[0]
    shares = usable_shares(unet, _requested(share))

    def run(rows: int):
        # Each chunk's errors go straight from its predictions (read once by the fused kernel, the target
        # read in place for all concepts) into err: no buffer of all predictions, no torch.cat.
        err = torch.empty((B, K, T), device=inputs.x0.device, dtype=torch.float32)
        kept = None
        for chunk in plan_chunks(B, K, T, lambda: rows):
            pred = _chunk_predictions(unet, inputs, cond, chunk, shares)
            err[chunk.index] = dc_error(pred, _pair_target(inputs, chunk), loss, huber_delta)
            for slot, k in enumerate(keep):
                if chunk.k0 <= k < chunk.k1:
                    if kept is None:
                        kept = pred.new_empty((B, len(keep), T, pred.shape[-1]))
                    kept[chunk.b0:chunk.b1, slot, chunk.j0:chunk.j1] = pred[:, k - chunk.k0]
        return (err, kept) if keep else err

    explicit = max_batch is not None or inputs.x0.device.type == "cpu"  # OOM halving: CUDA's default only
    if torch.is_grad_enabled():
        return _with_oom_retry(run, _chunk_rows(unet, inputs, cond, max_batch, shares), explicit)
    with torch.inference_mode():  # as fast as no_grad gets; results are cloned out of inference mode below
        out = _with_oom_retry(run, _chunk_rows(unet, inputs, cond, max_batch, shares), explicit)
    return tuple(t.clone() for t in out) if keep else out.clone()


def dc_logits(err: torch.Tensor, temperature: float = 1.0, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DC logits (B, K) = -(1/T) sum_j w_j err[b,k,j] / temperature; softmax over K gives p(c_k | x0)."""
    if err.dim() != 3:
        raise ValueError(f"err must be (B, K, T), got {tuple(err.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, _, T = err.shape
    if weights is None:
        return -err.mean(-1) / temperature
    weights = torch.as_tensor(weights, dtype=err.dtype, device=err.device)
    if weights.shape not in ((T,), (B, T)):
        raise ValueError(f"weights must be (T,) = ({T},) or (B, T) = ({B}, {T}), got {tuple(weights.shape)}")
    weights = weights.view(-1, 1, T) if weights.dim() == 2 else weights.view(1, 1, T)
    return -(err * weights).sum(-1) / (T * temperature)


def dc_loss_backward(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor], torch.Tensor], *, timesteps=None, noise=None,
                     num_timesteps: int = 8, generator: Optional[torch.Generator] = None, loss: str = "l2",
                     max_batch: Optional[int] = None, huber_delta: float = 1.0,
                     share=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate `loss_fn(err)` at the memory of one chunk, with the unchunked pass's gradients.

    The softmax over concepts couples all K*T errors of an image, so chunks cannot be backpropagated
    independently with their own loss. Two passes instead (DESIGN 2.2):
      (a) every chunk's errors without grad -> err; loss_fn(err).backward() gives dL/d err;
      (b) per chunk, recompute the U-Net rows with grad and backpropagate dL/d err of those rows.
    Gradients accumulate into `.grad` of the U-Net's parameters (and of x0/cond when they require
    grad; their upstream graphs are traversed once, after the last chunk). `max_batch` and `share` as in
    `dc_scores` (every share recomputes per chunk, so each chunk's graph is its own).
    Returns (loss, err), both detached.
    """
    _check_loss(loss)
    x0_leaf = x0.detach().requires_grad_(x0.requires_grad)
    cond_leaf = cond.detach().requires_grad_(cond.requires_grad)
    inputs = prepare_inputs(unet, scheduler, x0_leaf, cond_leaf, timesteps=timesteps, noise=noise,
                            num_timesteps=num_timesteps, generator=generator)
    with torch.no_grad():
        err = _errors(unet, inputs, cond_leaf, loss, max_batch, huber_delta, share)
    err = err.requires_grad_(True)
    with torch.enable_grad():
        value = loss_fn(err)
        if value.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(value.shape)}")
        (grad_err,) = torch.autograd.grad(value, err)

    B, T = inputs.shape
    K = cond.shape[0]
    with torch.enable_grad():
        shares = usable_shares(unet, _requested(share))
        rows = _chunk_rows(unet, inputs, cond_leaf, max_batch, shares)
        for chunk in plan_chunks(B, K, T, lambda: rows):
            pred = _chunk_predictions(unet, inputs, cond_leaf, chunk, shares)
            target = _pair_target(inputs, chunk)  # per chunk: its graph to x0 is the chunk's own
            dc_error(pred, target, loss, huber_delta).backward(grad_err[chunk.index])
    if x0.requires_grad:
        x0.backward(x0_leaf.grad)
    if cond.requires_grad:
        cond.backward(cond_leaf.grad)
    return value.detach(), err.detach()
