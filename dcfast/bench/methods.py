"""`dcfast bench methods --seeds 3`: every continual-personalization method on the demo's tasks.

Runs the demo (`dcfast.demo`: by default the world's same-class test sequence, the shipped base
model, the world's training settings and evaluation) once per (method, seed) and reports final
fidelity, BwT-fidelity, fidelity forgetting (first N-1 concepts), AMMD, BwT-MMD, final DC accuracy,
accuracy forgetting, training and evaluation time per method as mean ± std over seeds (sample std;
0 with one seed), as a table (methods.md, methods.json) and a plot (methods.png) under the output
folder. Seeds change the renders, the LoRA init, the training noise and the evaluation noise together.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dcfast.atomic import write_atomic, write_json_atomic
from dcfast.demo import DemoConfig, replace, run_method, write_concepts

METRICS = (("final_fidelity", "final fidelity ↑"), ("bwt_fidelity", "BwT-fidelity ↑ (− = forgetting)"),
           ("fidelity_forgetting", "fidelity forgetting ↓"), ("ammd", "AMMD ↓"), ("bwt_mmd", "BwT-MMD ↓ (+ = forgetting)"), ("final_accuracy", "final accuracy ↑"),
           ("forgetting", "forgetting ↓"), ("train_seconds", "train s"), ("eval_seconds", "eval s"))


def _mean_std(values: List[float]) -> Dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{method: {metric: {mean, std, n}}} over the seeds of `rows` (one row per (method, seed))."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return {m: {k: _mean_std([r["summary"].get(k) for r in rows if r["method"] == m]) for k, _ in METRICS}
            for m in methods}


def table(stats: Dict[str, Dict[str, Dict[str, float]]], seeds: int) -> str:
    lines = [f"| method (mean ± std over {seeds} seeds) | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for method, values in stats.items():
        cells = [f"{values[k]['mean']:.4g} ± {values[k]['std']:.2g}" if values[k]["n"] else "–" for k, _ in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(stats: Dict[str, Dict[str, Dict[str, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in METRICS if m[0] in ("final_fidelity", "fidelity_forgetting", "ammd", "final_accuracy",
                                             "train_seconds")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2))
    names = list(stats)
    for ax, (key, title) in zip(axes, panels):
        ax.bar(range(len(names)), [stats[m][key]["mean"] for m in names],
               yerr=[stats[m][key]["std"] for m in names], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def run(seeds: int = 3, quick: bool = False, device: str = "cpu", methods: Optional[Sequence[str]] = None,
        output_dir: str = "dcfast-bench-methods", config: Optional[DemoConfig] = None) -> Dict[str, object]:
    """Every method x `seeds` seeds on the demo tasks; print and write the table and plot.

    `quick`: 2 tasks x 10 steps and 4 generated images (a smoke run, numbers meaningless).
    Returns {"rows": per (method, seed), "stats": {method: {metric: mean/std/n}}, "summary": flat
    "{method}/{metric}" means, "table": markdown, "paths": written files}.
    """
    from dcfast.methods import METHODS

    if device != "cpu":
        raise ValueError(f"device: `dcfast bench methods` runs the CPU demo; got {device!r}")
    if seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {seeds}")
    base = config or DemoConfig()
    base = replace(base, output_dir=output_dir)
    if quick:
        base = replace(base, num_tasks=2, max_train_steps=10, num_images=4, num_inference_steps=10)
    methods = list(methods or METHODS)
    rows = []
    for seed in range(seeds):
        seeded = replace(base, seed=seed, output_dir=str(Path(output_dir) / f"seed_{seed}"))
        tasks = write_concepts(seeded)
        for method in methods:
            run_dir = str(Path(seeded.output_dir) / method.replace("+", "_"))
            result = run_method(seeded, method, tasks, run_dir)
            rows.append({"method": method, "seed": seed, "run_dir": run_dir, "summary": result["summary"]})
    stats = aggregate(rows)
    text = table(stats, seeds)
    out = Path(output_dir)
    command = f"dcfast bench methods --seeds {seeds}" + (" --quick" if quick else "")
    settings = {"num_tasks": base.num_tasks, "max_train_steps": base.max_train_steps, "num_images": base.num_images,
                "num_inference_steps": base.num_inference_steps}
    write_atomic(out / "methods.md", lambda tmp: Path(tmp).write_text(f"`{command}` ({settings})\n\n{text}\n"))
    write_json_atomic(out / "methods.json", {"command": command, "settings": settings, "stats": stats, "rows": rows})
    paths = {"table": str(out / "methods.md"), "json": str(out / "methods.json"),
             "plot": str(plot(stats, out / "methods.png"))}
    print(text)
    print(f"table {paths['table']}, plot {paths['plot']}")
    summary = {f"{m}/{k}": v[k]["mean"] for m, v in stats.items() for k, _ in METRICS}
    return {"rows": rows, "stats": stats, "summary": summary, "table": text, "paths": paths}
