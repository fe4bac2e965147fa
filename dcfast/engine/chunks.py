"""How a DC pass is cut: chunks of rows (images x concepts x pairs, ordered (b, k, j) image-major), and the
chunk size, autotuned once on CPU per (U-Net config, row shape, device, dtype, threads) and cached in
memory (`chunk_tuner`), where CUDA runs the whole pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, FrozenSet

import torch

from dcfast.engine.targets import DCInputs
from dcfast.engine.unet_pass import Layout, hooked


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
    """The engine's chunk sizes by key; `dcfast.engine.chunks.chunk_tuner`. `clear()` forgets them (re-tune)."""

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


def unet_fingerprint(unet) -> tuple:
    config = getattr(unet, "config", None)
    items = repr(sorted(dict(config).items())) if config is not None else ""
    return type(unet).__name__, items, sum(p.numel() for p in unet.parameters())


def tune(inputs: DCInputs, K: int, tuning: _Tuning, run_chunk: Callable[[Chunk], object]) -> int:
    """Time `run_chunk` on the first chunk each candidate cuts from these inputs, ascending (results discarded)."""
    B, T = inputs.shape
    for budget in tuning.candidates:
        chunk = next(plan_chunks(B, K, T, lambda: budget))
        spent = 0.0
        while len(tuning.seconds[budget]) < TUNE_ROUNDS or (spent < TUNE_MIN_SECONDS
                                                             and len(tuning.seconds[budget]) < TUNE_MAX_RUNS):
            start = time.perf_counter()
            run_chunk(chunk)
            elapsed = time.perf_counter() - start
            tuning.record(budget, chunk.rows, elapsed)
            spent += elapsed
        best = tuning.fastest()
        if min(tuning.seconds[budget]) > TUNE_STOP * min(tuning.seconds[best]):
            break
    tuning.best = tuning.fastest()
    return tuning.best


def chunk_rows(unet, inputs: DCInputs, cond: torch.Tensor, max_batch: Optional[int], shares: FrozenSet[str],
               run_chunk: Callable[[Chunk], object]) -> int:
    """Row budget of this pass: max_batch when given; on CUDA the whole pass; on CPU the tuned size for this
    (U-Net config, row shape, device, dtype, threads, grad, autocast, shares), tuned on first use by timing
    `run_chunk` (the pass's own chunk of U-Net rows)."""
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
    key = (unet_fingerprint(unet), tuple(inputs.x0.shape[1:]), tuple(cond.shape[1:]), K, T,
           min(total, max(CPU_CANDIDATES)), tuple(sorted(shares)), str(device), inputs.x0.dtype,
           torch.get_num_threads(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
    tuning = chunk_tuner.state(key, K, T, total)
    if tuning is None:
        return total
    if tuning.best is None:
        if hooked(unet):  # a hook would see the timing runs (a Fisher track would count them)
            return min(CPU_FALLBACK, total)
        tune(inputs, K, tuning, run_chunk)
    return tuning.best
