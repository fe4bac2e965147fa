"""`dcfast bench methods --seeds 3`: every continual-personalization method on the world's test sequences.

Runs the demo pipeline (`dcfast.experiments.runner`: the shipped base model, the world's training settings and
evaluation) once per (sequence, method, seed) and reports, per sequence, final fidelity, BwT-fidelity,
fidelity forgetting (first N-1 concepts, Chaudhry et al.), plasticity, training time and its ratio to sequential
LoRA's as mean ± std over seeds (sample std; 0 with one seed), as
tables (methods.md, methods.json) and a plot per sequence. Seeds change the renders, the LoRA init, the
training noise and the evaluation noise together; every method of a seed sees the same renders.

Each method is also compared with sequential LoRA seed by seed (paired): the per-seed differences of
fidelity forgetting and final fidelity, their mean ± std, and a verdict that calls a method better or
worse only when every seed agrees on the sign and the mean difference exceeds the differences' std
("no difference beyond the seed spread" otherwise).

Runs are judged by the oracle's fidelity only: plasticity (mean F[i, i]), fidelity forgetting, final fidelity.
DC accuracy is left out, since EWC-DC and DSC optimise that classification directly.

`--quick`: one seed of every method on the novel same-class test sequence's first two concepts at QUICK_STEPS
steps per task (a smoke check; the tables use the world regime); its last two lines are
`forgetting lora=<f> ewc=<f> ...` (fidelity forgetting of every continual method) and
`final lora=<f> ... joint=<f>` (final fidelity, the joint upper bound included).
Runs go to separate processes (`workers`, one torch thread each): on a small CPU model two
single-threaded runs finish sooner than one two-threaded run after the other. A run already finished
in the output folder with the same settings is reused, so a killed benchmark resumes where it stopped.
"""
from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from dcfast.io.atomic import write_atomic, write_json_atomic
from dcfast.experiments.runner import DemoConfig, replace, run_method, write_concepts

METRICS = (("final_fidelity", "final fidelity ↑"), ("plasticity", "plasticity ↑ (mean F[i, i])"),
           ("fidelity_forgetting", "fidelity forgetting ↓"), ("bwt_fidelity", "BwT-fidelity ↑ (− = forgetting)"),
           ("train_seconds", "train s"), ("train_vs_lora", "train time ÷ LoRA's (same seed)"))
# (metric, +1 if higher is better else -1) of the paired comparison against sequential LoRA
PAIRED = (("fidelity_forgetting", -1), ("final_fidelity", +1))
TEST_SEQUENCES = ("novel-same-class-test", "novel-distinct-class-test", "novel-same-class-long-test",
                  "known-same-class-test")
QUICK_SEQUENCE = "novel-same-class-test"
QUICK_TASKS = 2  # forgetting needs two tasks
# --quick's steps per task: every method (EWC-DC and DSC at ~4x a LoRA step) inside the 15 minutes on
# 2 cores; a smoke check of the pipeline and the ranking's direction, not the regime's numbers.
QUICK_STEPS = 200
CONTROLS = ("joint",)  # the offline upper bound: in the final line, not in the forgetting line (it never forgets)


def _mean_std(values: List[float]) -> Dict[str, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def add_time_against_lora(rows: List[Dict[str, object]]) -> None:
    """Each row's train time divided by sequential LoRA's on the same sequence and seed (summary "train_vs_lora"),
    where that LoRA run is among the rows."""
    lora = {(r["sequence"], r["seed"]): r["summary"].get("train_seconds") for r in rows if r["method"] == "lora"}
    for r in rows:
        reference, seconds = lora.get((r["sequence"], r["seed"])), r["summary"].get("train_seconds")
        r["summary"]["train_vs_lora"] = seconds / reference if reference and seconds is not None else None


def aggregate(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{method: {metric: {mean, std, n}}} over the seeds of `rows` (one row per (method, seed))."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return {m: {k: _mean_std([r["summary"].get(k) for r in rows if r["method"] == m]) for k, _ in METRICS}
            for m in methods}


def paired(rows: List[Dict[str, object]], reference: str = "lora") -> Dict[str, Dict[str, Dict[str, object]]]:
    """{method: {metric: {diffs, mean, std, verdict}}}: each method minus `reference`, seed by seed.

    verdict: "better"/"worse" when every seed's difference has the same sign and |mean| > std of the
    differences, else "no difference beyond the seed spread" (also with one seed: no spread to judge).
    """
    by_seed = {r["seed"]: r["summary"] for r in rows if r["method"] == reference}
    result = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != reference):
        result[method] = {}
        for key, sign in PAIRED:
            diffs = [r["summary"][key] - by_seed[r["seed"]][key] for r in rows
                     if r["method"] == method and r["seed"] in by_seed
                     and r["summary"].get(key) is not None and by_seed[r["seed"]].get(key) is not None]
            stats = _mean_std(diffs)
            consistent = len(diffs) > 1 and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
            verdict = "no difference beyond the seed spread"
            if consistent and abs(stats["mean"]) > stats["std"]:
                verdict = "better" if sign * stats["mean"] > 0 else "worse"
            result[method][key] = {"diffs": diffs, "mean": stats["mean"], "std": stats["std"], "verdict": verdict}
    return result


def table(stats: Dict[str, Dict[str, Dict[str, float]]], seeds: int) -> str:
    lines = [f"| method (mean ± std over {seeds} seeds) | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for method, values in stats.items():
        cells = [f"{values[k]['mean']:.4g} ± {values[k]['std']:.2g}" if values[k]["n"] else "–" for k, _ in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(comparison: Dict[str, Dict[str, Dict[str, object]]], reference: str = "lora") -> str:
    """One sentence per method: its paired differences against `reference` and the verdict."""
    lines = []
    for method, by_metric in comparison.items():
        parts = [f"{key.replace('_', ' ')} {v['mean']:+.3f} ± {v['std']:.3f} ({v['verdict']})"
                 for key, v in by_metric.items()]
        lines.append(f"- **{method}** vs {reference}, paired over seeds: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def plot(results: Dict[str, Dict[str, Dict[str, Dict[str, float]]]], path: Path) -> Path:
    """One row of bar panels per sequence: final fidelity, plasticity, fidelity forgetting, train time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in METRICS if m[0] in ("final_fidelity", "plasticity", "fidelity_forgetting", "train_seconds")]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(3.0 * len(panels), 3.2 * len(results)), squeeze=False)
    for row, (sequence, stats) in zip(axes, results.items()):
        names = list(stats)
        for ax, (key, title) in zip(row, panels):
            ax.bar(range(len(names)), [stats[m][key]["mean"] for m in names],
                   yerr=[stats[m][key]["std"] for m in names], capsize=3, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{sequence}: {title}" if key == panels[0][0] else title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _run_one(job: tuple, threads: Optional[int]) -> Dict[str, object]:
    """One (sequence, seed, method, config, tasks, run_dir) job's summary; `threads` set in a worker process."""
    _, _, method, config, tasks, run_dir = job
    if threads:
        import torch

        torch.set_num_threads(threads)
    result = run_method(config, method, tasks, run_dir, log=lambda line: None, reuse=True)
    return result["summary"]


def run_jobs(jobs: List[tuple], workers: int) -> List[Dict[str, object]]:
    """The summaries of every (sequence, seed, method, DemoConfig, tasks, run_dir) job, in job order, `workers` at a
    time; one progress line per finished run."""
    def done(count: int, job: tuple, summary: Dict[str, object]) -> None:
        sequence, seed, method = job[:3]
        scores = ", ".join(f"{label} {summary[key]:.3f}" for key, label in (("final_fidelity", "final fidelity"),
                           ("fidelity_forgetting", "fidelity forgetting")) if summary.get(key) is not None)
        print(f"[{count}/{len(jobs)}] {sequence} seed {seed} {method}: {scores} (train {summary['train_seconds']:.0f} s, "
              f"eval {summary['eval_seconds']:.0f} s)", flush=True)

    if workers == 1:
        summaries = []
        for job in jobs:
            summaries.append(_run_one(job, None))
            done(len(summaries), job, summaries[-1])
        return summaries
    summaries = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_one, job, 1): k for k, job in enumerate(jobs)}
        for count, future in enumerate(as_completed(futures), 1):
            k = futures[future]
            summaries[k] = future.result()
            done(count, jobs[k], summaries[k])
    return summaries


def run(seeds: int = 3, quick: bool = False, device: str = "cpu", methods: Optional[Sequence[str]] = None,
        output_dir: str = "dcfast-bench-methods", config: Optional[DemoConfig] = None,
        sequences: Optional[Sequence[str]] = None, workers: int = 1, adapter: Optional[str] = None) -> Dict[str, object]:
    """Every method x `seeds` seeds on each test sequence; print and write the tables and plot.

    `quick`: seed 0, the novel same-class test sequence's first two concepts, QUICK_STEPS steps per task (unless
    `config` sets max_train_steps). `workers` > 1 runs that many
    runs at once in separate processes with one torch thread each. `adapter` ("lora" or "vera"): the U-Net
    adapter of every method's runs (TrainConfig.adapter; None: the regime's, LoRA).
    Returns {"rows": per (sequence, method, seed), "stats": {sequence: {method: {metric: mean/std/n}}},
    "paired": {sequence: comparison with lora}, "summary": flat "{sequence}/{method}/{metric}" means
    (plus "{method}" = fidelity forgetting on the first sequence), "table": markdown, "paths"}.
    """
    from dcfast.training.methods import METHODS

    if device != "cpu":
        raise ValueError(f"device: `dcfast bench methods` runs the CPU demo; got {device!r}")
    if seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {seeds}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    from dcfast.training.config import ADAPTERS

    if adapter is not None and adapter not in ADAPTERS:
        raise ValueError(f"adapter: {adapter!r} is not one of {', '.join(ADAPTERS)}")
    # the oracle's fidelity is the yardstick: DC accuracy is what EWC-DC and DSC optimise, so it is not measured
    base = replace(config or DemoConfig(), output_dir=output_dir, progress=False, fidelity_only=True)
    if adapter is not None:
        base = replace(base, train_overrides={**base.train_overrides, "adapter": adapter})
    if quick:
        seeds, sequences = 1, sequences or [QUICK_SEQUENCE]
        base = replace(base, num_tasks=QUICK_TASKS, max_train_steps=base.max_train_steps or QUICK_STEPS)
    sequences = list(sequences or ([base.sequence] if config is not None else TEST_SEQUENCES))
    from dcfast.world.scenes import SEQUENCES

    unknown = [s for s in sequences if s not in SEQUENCES]
    if unknown:
        raise ValueError(f"sequence: unknown {unknown}; known: {', '.join(SEQUENCES)}")
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"method: unknown {unknown}; known: {', '.join(METHODS)}")
    jobs = []
    for sequence in sequences:
        for seed in range(seeds):
            seeded = replace(base, sequence=sequence, seed=seed,
                             output_dir=str(Path(output_dir) / sequence / f"seed_{seed}"))
            tasks = write_concepts(seeded)  # once per (sequence, seed): every method sees the same renders
            jobs += [(sequence, seed, method, seeded, tasks, str(Path(seeded.output_dir) / method.replace("+", "_")))
                     for method in methods]
    summaries = run_jobs(jobs, workers)
    rows = [{"sequence": s, "method": m, "seed": seed, "run_dir": d, "summary": dict(summary)}
            for (s, seed, m, _, _, d), summary in zip(jobs, summaries)]
    add_time_against_lora(rows)
    stats = {s: aggregate([r for r in rows if r["sequence"] == s]) for s in sequences}
    comparison = {s: paired([r for r in rows if r["sequence"] == s]) if "lora" in methods else {} for s in sequences}
    command = (f"dcfast bench methods --seeds {seeds}" + (" --quick" if quick else "")
               + "".join(f" --sequence {s}" for s in sequences if list(sequences) != list(TEST_SEQUENCES))
               + "".join(f" --method {m}" for m in methods if list(methods) != list(METHODS))
               + (f" --adapter {adapter}" if adapter is not None else ""))
    settings = {"sequences": sequences, "num_tasks": base.num_tasks, "max_train_steps": base.max_train_steps,
                "num_images": base.num_images, "fidelity_images": base.fidelity_images,
                "num_inference_steps": base.num_inference_steps, "train_overrides": dict(base.train_overrides)}
    text = "\n\n".join(f"### {s}\n\n{table(stats[s], seeds)}\n\n{verdicts(comparison[s])}".rstrip() for s in sequences)
    out = Path(output_dir)
    write_atomic(out / "methods.md", lambda tmp: Path(tmp).write_text(f"`{command}` ({settings})\n\n{text}\n"))
    write_json_atomic(out / "methods.json", {"command": command, "settings": settings, "stats": stats,
                                             "paired": comparison, "rows": rows})
    paths = {"table": str(out / "methods.md"), "json": str(out / "methods.json"),
             "plot": str(plot(stats, out / "methods.png"))}
    print(text)
    print(f"table {paths['table']}, plot {paths['plot']}")
    summary = {f"{s}/{m}/{k}": v[k]["mean"] for s in sequences for m, v in stats[s].items() for k, _ in METRICS}
    first = stats[sequences[0]]
    summary.update({m: first[m]["fidelity_forgetting"]["mean"] for m in methods})
    # the closing lines: fidelity forgetting of every continual method, final fidelity of every run
    print("forgetting " + " ".join(f"{m}={summary[m]:.4g}" for m in methods if m not in CONTROLS))
    print("final " + " ".join(f"{m}={first[m]['final_fidelity']['mean']:.4g}" for m in methods))
    return {"rows": rows, "stats": stats, "paired": comparison, "summary": summary, "table": text, "paths": paths}
