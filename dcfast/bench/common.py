"""Timing, peak-memory and table helpers shared by every `dcfast bench` command."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop chatter off the tables


def synchronize(device: str) -> None:
    """Wait for queued CUDA work so wall-clock times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs, CUDA synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(cases: Dict[str, Callable[[], object]], rounds: int, device: str) -> Dict[str, List[float]]:
    """Wall-clock seconds of every case, `rounds` times, cases interleaved within each round.

    On a shared machine the load drifts over minutes: running case A's repeats, then case B's, would give
    their ratio the drift. Interleaved, each round sees every case under about the same load; the ratio of
    medians over rounds then compares like with like. Warm-up is the caller's.
    """
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_memory(fn: Callable[[], object], device: str) -> Tuple[object, int]:
    """(fn(), peak bytes allocated by torch during the call above what was allocated before it).

    CUDA reads the caching allocator's peak; CPU replays the profiler's allocation events, whose
    running 'Total Allocated' counts bytes from the start of profiling.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return result, max([0] + totals)


def format_table(rows: Sequence[Dict[str, object]], columns: List[str]) -> str:
    """A plain aligned text table of `rows` (dicts) over `columns`."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def environment(device: str) -> Dict[str, str]:
    """Device name and versions, attached to every benchmark result."""
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    import diffusers

    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__}
