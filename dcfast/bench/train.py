"""`dcfast bench train`: per-step training time of every method relative to sequential LoRA.

Each method trains the same two synthetic tasks on the tiny model (built in code, no download);
the timed steps are task 2's, where every regulariser is active (EWC penalty, DC term, C-LoRA's
merged past). Consolidation (Fisher, DSC distillation) runs once per task and is reported apart.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List


from dcfast.bench.common import environment, format_table
from dcfast.config import TrainConfig
from dcfast.data import write_shape_images
from dcfast.methods import METHODS
from dcfast.models import tiny

COLUMNS = ["method", "median_step_s", "ratio_vs_lora", "task2_seconds", "consolidation_s"]
COLOURS = {"dog": (200, 60, 20), "mug": (30, 60, 200)}


def _time_method(method: str, model_dir: Path, concepts: Dict[str, Path], out: Path, steps: int) -> Dict:
    from dcfast.trainer import train

    stamps: List[float] = []
    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=str(model_dir), output_dir=str(out / method), method=method,
        tasks=[{"images": str(folder), "class_word": word} for word, folder in concepts.items()],
        max_train_steps=steps, train_batch_size=2, checkpointing_steps=10 * steps, dsc_iterations=steps))
    result = train(config, step_callback=lambda task, step, models: task == 2 and stamps.append(time.perf_counter()))
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    task2 = result.metrics[1]["seconds"]
    return {"method": method, "median_step_s": statistics.median(step_times), "task2_seconds": task2,
            "consolidation_s": task2 - sum(step_times)}


def run(quick: bool = False, device: str = "cpu") -> Dict[str, object]:
    """Train every method on two tiny tasks; print and return per-step times relative to `lora`."""
    if device != "cpu":
        raise ValueError("dcfast bench train runs the tiny model on the CPU; use --device cpu")
    steps = 4 if quick else 12
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny(seed=0).save_pretrained(root / "model")
        concepts = {word: write_shape_images(root / word, colour) for word, colour in COLOURS.items()}
        rows = [_time_method(method, root / "model", concepts, root / "runs", steps) for method in METHODS]
    base = next(r for r in rows if r["method"] == "lora")["median_step_s"]
    for row in rows:
        row["ratio_vs_lora"] = row["median_step_s"] / base
    print(format_table(rows, COLUMNS))
    slowest = max(rows, key=lambda r: r["ratio_vs_lora"])
    summary = {"max_step_ratio_vs_lora": slowest["ratio_vs_lora"], "slowest_method": slowest["method"],
               "steps_per_task": steps}
    return {"rows": rows, "summary": summary, "environment": environment(device)}
