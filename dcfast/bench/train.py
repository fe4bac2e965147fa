"""`dcfast bench train`: per-step training time of every method relative to sequential LoRA, and EWC-DC's
step time relative to LoRA for each (k, T) = (num_dc_concepts, num_dc_timesteps).

Each method trains the same synthetic tasks on the tiny model (built in code, no download); the timed
steps are the last task's, where every regulariser is active (EWC penalty, DC term, C-LoRA's merged
past). Consolidation (Fisher, DSC distillation) runs once per task and is reported apart.

The (k, T) grid trains k - 1 tasks (at least 2), so that S holds k concepts in the timed task, with and
without `dc_denoise_rows` (the denoising loss from the DC pass's own c_n rows); each grid row is compared
with LoRA trained on the same tasks. At EWC-DC's default (k, T), `dc_every` m (the DC term every m-th step) is
timed too, over whole periods of m steps. Ratios are of mean step times, the cost a task pays per step (with
dc_every > 1 the median would be a step without the DC term); the medians are reported beside them. Runs follow
one another: on a shared machine the ratios carry the load's drift between runs.

`--arch sd15` measures a real architecture instead: `dcfast.bench.train_arch`.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dcfast.bench.common import environment, format_table
from dcfast.training.config import TrainConfig
from dcfast.io.images import write_shape_images
from dcfast.training.methods import METHODS
from dcfast.models.tiny import tiny

COLUMNS = ["method", "median_step_s", "mean_step_s", "ratio_vs_lora", "task_seconds", "consolidation_s"]
GRID_COLUMNS = ["sweep", "k", "T", "dc_denoise_rows", "dc_every", "unet_rows_per_image", "median_step_s",
                "mean_step_s", "lora_step_s", "ratio_vs_lora"]
COLOURS = {"dog": (200, 60, 20), "mug": (30, 60, 200), "cat": (40, 160, 40)}
GRID = ((2, 3, 4), (1, 2, 4, 8))  # k values, T values
QUICK_GRID = ((2, 4), (4,))
DC_EVERY = (2, 4)  # EWC-DC's dc_every values timed at its default (k, T), beside dc_every 1 of the grid


def _time_method(method: str, model_dir: Path, concepts: Dict[str, Path], out: Path, steps: int, **fields) -> Dict:
    """Train `method` on every task of `concepts`; median and mean step time of the last task's steps 1.. (step 0
    is not timed), its seconds, consolidation."""
    from dcfast.training.trainer import train

    last = len(concepts)
    stamps: List[float] = []
    name = "-".join([method] + [f"{k}{v}" for k, v in sorted(fields.items())])
    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=str(model_dir), output_dir=str(out / name), method=method,
        tasks=[{"images": str(folder), "class_word": word} for word, folder in concepts.items()],
        max_train_steps=steps, train_batch_size=2, checkpointing_steps=10 * steps, dsc_iterations=steps, **fields),
        ignore_other_methods=True)  # dsc_iterations: read by the DSC methods only
    result = train(config, step_callback=lambda task, step, models: task == last and stamps.append(time.perf_counter()))
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    # a joint run's phase trains every task at once, its seconds shared equally among them: the phase is all of them
    seconds = (sum(m["seconds"] for m in result.metrics) if "trained_jointly_with" in result.metrics[-1]
               else result.metrics[-1]["seconds"])
    return {"method": method, "median_step_s": statistics.median(step_times),
            "mean_step_s": statistics.fmean(step_times), "task_seconds": seconds,
            "consolidation_s": seconds - sum(step_times)}


def _grid_row(root: Path, tasks: Dict[str, Path], out: Path, steps: int, lora: float, k: int, T: int,
              from_rows: bool = False, every: int = 1) -> Dict:
    """One EWC-DC configuration's step time against LoRA's mean step `lora` on the same tasks."""
    timed = _time_method("ewc-dc", root / "model", tasks, out, steps, num_dc_concepts=k, num_dc_timesteps=T,
                         dc_denoise_rows=from_rows, dc_every=every)
    return {"k": k, "T": T, "dc_denoise_rows": from_rows, "dc_every": every,
            "unet_rows_per_image": k * T / every + (0 if from_rows else 1),
            "median_step_s": timed["median_step_s"], "mean_step_s": timed["mean_step_s"], "lora_step_s": lora,
            "ratio_vs_lora": timed["mean_step_s"] / lora}


def _grid_key(row: Dict) -> str:
    """The summary's name of a grid row: k4_T4, k4_T4_rows (the (k, T) sweep), k4_T4_every2 (the dc_every sweep,
    whose own dc_every 1 row, timed over other steps than the (k, T) sweep's, is k4_T4_every1)."""
    rows = "_rows" if row["dc_denoise_rows"] else ""
    every = f"_every{row['dc_every']}" if row["sweep"] == "dc_every" else ""
    return f"k{row['k']}_T{row['T']}{rows}{every}"


def _grid(root: Path, concepts: Dict[str, Path], steps: int, ks, ts) -> List[Dict]:
    """EWC-DC's step time relative to LoRA at each (k, T), with and without dc_denoise_rows; then at the default
    (k, T) with each of DC_EVERY, over steps that hold whole periods of the largest."""
    rows = []
    for k in ks:
        tasks = {word: concepts[word] for word in list(concepts)[:max(2, k - 1)]}
        lora = _time_method("lora", root / "model", tasks, root / f"grid-k{k}", steps)["mean_step_s"]
        rows += [{**_grid_row(root, tasks, root / f"grid-k{k}", steps, lora, k, T, from_rows), "sweep": "k_T"}
                 for T in ts for from_rows in (False, True)]
    from dcfast.training.methods.ewc_dc import EWCDCSettings

    defaults = EWCDCSettings()
    k, T = defaults.num_dc_concepts, defaults.num_dc_timesteps
    period = max(DC_EVERY)
    timed_steps = period * -(-steps // period) + 1  # steps 1.. are timed: whole periods of every m in DC_EVERY
    tasks = {word: concepts[word] for word in list(concepts)[:max(2, k - 1)]}
    lora = _time_method("lora", root / "model", tasks, root / "every", timed_steps)["mean_step_s"]
    rows += [{**_grid_row(root, tasks, root / "every", timed_steps, lora, k, T, every=every), "sweep": "dc_every",
              "period_steps": timed_steps} for every in (1,) + DC_EVERY]
    return rows


def run(quick: bool = False, device: str = "cpu", arch: str = "tiny", latent_size: Optional[int] = None,
        methods: Optional[Sequence[str]] = None, mixed_precision: Optional[str] = None) -> Dict[str, object]:
    """Train every method on two tiny tasks, then the EWC-DC (k, T) grid; print and return step times vs `lora`.

    `arch` other than "tiny": one step of lora, ewc-dc and dsc (or `methods` of them) on that real architecture
    instead (`dcfast.bench.train_arch`, at `latent_size` and `mixed_precision`)."""
    if arch != "tiny":
        from dcfast.bench.train_arch import run as run_arch

        return run_arch(arch, quick=quick, device=device, latent_size=latent_size, methods=methods,
                        mixed_precision=mixed_precision)
    for name, value in (("--latent_size", latent_size), ("--method", methods), ("--mixed_precision", mixed_precision)):
        if value is not None:
            raise ValueError(f"{name}: the tiny model's bench trains every method at its own size and precision; "
                             f"{name} applies to --arch sd15 or sdxl")
    if device != "cpu":
        raise ValueError("dcfast bench train runs the tiny model on the CPU; use --device cpu")
    steps = 4 if quick else 12
    ks, ts = QUICK_GRID if quick else GRID
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny(seed=0).save_pretrained(root / "model")
        concepts = {word: write_shape_images(root / word, colour) for word, colour in COLOURS.items()}
        two = {word: concepts[word] for word in list(concepts)[:2]}
        rows = [_time_method(method, root / "model", two, root / "runs", steps) for method in METHODS]
        grid = _grid(root, concepts, steps, ks, ts)
    base = next(r for r in rows if r["method"] == "lora")["mean_step_s"]
    for row in rows:
        row["ratio_vs_lora"] = row["mean_step_s"] / base
    print(format_table(rows, COLUMNS))
    print(format_table(grid, GRID_COLUMNS))
    slowest = max(rows, key=lambda r: r["ratio_vs_lora"])
    summary = {"max_step_ratio_vs_lora": slowest["ratio_vs_lora"], "slowest_method": slowest["method"],
               "steps_per_task": steps,
               "ewc_dc_grid": {_grid_key(r): r["ratio_vs_lora"] for r in grid}}
    return {"rows": rows, "grid": grid, "summary": summary, "environment": environment(device)}
