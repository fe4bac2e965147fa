"""`dcfast bench world`: is the tiny world a yardstick that needs the LoRA? (the world's own check)

Three runs per seed on the novel same-class test sequence (shapes the base model never saw,
`dcfast.world.scenes`), in the world regime (`dcfast.experiments.regimes.WORLD_TRAIN`):

- `lora` (sequential LoRA) must learn each concept (plasticity, mean F[i, i], high) and then lose it
  (fidelity forgetting over the first N-1 concepts, high): a testbed where nothing is forgotten cannot rank methods;
- `ti` (textual inversion, the U-Net untouched) must fail to draw them (mean F[i, i] low): a concept a token alone
  can point at needs no continual method;
- `joint` (one LoRA on every concept at once, the offline upper bound) must keep them all (final fidelity high).

`--quick` runs seed 0 on the novel sequence's first two concepts (state 1's fidelity, and its forgetting under the
second task); runs are judged by the oracle's fidelity only (no DC accuracy or MMD). The full run adds the known-attribute sequence
(`known-same-class-test`) beside it. The closing line is
`state1_fidelity=<lora F[1,1]> lora_forgetting=<f> ti_fidelity=<ti mean F[i,i]> joint_final_fidelity=<f>` (means
over seeds, novel sequence); every fidelity matrix and summary goes to `world.json`, the table to `world.md`.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from dcfast.experiments.bench_methods import QUICK_TASKS, run_jobs
from dcfast.experiments.runner import DemoConfig, replace, write_concepts
from dcfast.io.atomic import write_atomic, write_json_atomic

NOVEL_SEQUENCE = "novel-same-class-test"
KNOWN_SEQUENCE = "known-same-class-test"
METHODS = ("lora", "ti", "joint")
# The yardstick's bars on the novel sequence (mean over seeds): (method, metric, comparison, bound).
BARS = (("ti", "plasticity", "<=", 0.3), ("lora", "plasticity", ">=", 0.8), ("lora", "forgetting", ">=", 0.5),
        ("joint", "final", ">=", 0.8))
METRICS = ("plasticity", "forgetting", "final", "state1")


def fidelity_summary(run_dir: Path, eval_dir: str = "eval") -> Dict[str, object]:
    """A finished world run's fidelity (from `eval_dir`/metrics.json): the matrix, F[i, i] and their mean
    (plasticity), fidelity forgetting over the first N-1 concepts, final fidelity, and concept 1's fidelity at its
    own state (state1)."""
    data = json.loads((Path(run_dir) / eval_dir / "metrics.json").read_text())
    matrix = data["fidelity"]["all"]
    diagonal = [matrix[i][i] for i in range(len(matrix))]
    return {"fidelity": matrix, "F_diag": diagonal, "plasticity": statistics.fmean(diagonal),
            "forgetting": data["summary"]["fidelity_forgetting"], "final": data["summary"]["final_fidelity"],
            "state1": matrix[0][0],
            "colour_diag": [data["fidelity"]["colour"][i][i] for i in range(len(matrix))],
            "shape_diag": [data["fidelity"]["shape"][i][i] for i in range(len(matrix))]}


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _table(stats: Dict[str, Dict[str, Dict[str, Dict[str, float]]]]) -> str:
    lines = []
    for sequence, by_method in stats.items():
        lines += [f"### {sequence}", "",
                  "| method | plasticity (mean F[i, i]) | fidelity forgetting (first N-1) | final fidelity | F[1, 1] |",
                  "|---|---|---|---|---|"]
        for method, metrics in by_method.items():
            cells = " | ".join(f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in METRICS)
            lines.append(f"| {method} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def _verdicts(novel: Dict[str, Dict[str, Dict[str, float]]]) -> List[Dict[str, object]]:
    verdicts = []
    for method, metric, comparison, bound in BARS:
        value = novel[method][metric]["mean"]
        holds = value <= bound if comparison == "<=" else value >= bound
        verdicts.append({"method": method, "metric": metric, "bar": f"{comparison} {bound}", "value": value,
                         "holds": holds})
    return verdicts


def run(quick: bool = False, device: str = "cpu", seeds: int = 3, output_dir: str = "dcfast-bench-world",
        config: Optional[DemoConfig] = None, workers: int = 3, sequences: Optional[List[str]] = None) -> Dict[str, object]:
    """`lora`, `ti` and `joint` on the novel same-class test sequence (and the known one unless `quick`) for
    `seeds` seeds (1 with `quick`), `workers` runs at once. `sequences` replaces those two (the novel one first:
    the closing line and the bars are read there).

    Returns {"rows": per (sequence, method, seed), "stats": {sequence: {method: {metric: mean/std/n}}},
    "bars": the yardstick's verdicts, "summary": the closing line's values, "table": markdown}.
    """
    if device != "cpu":
        raise ValueError(f"device: `dcfast bench world` runs on the CPU; got {device!r}")
    if seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {seeds}")
    seeds = 1 if quick else seeds
    default = [NOVEL_SEQUENCE] if quick else [NOVEL_SEQUENCE, KNOWN_SEQUENCE]
    sequences = list(sequences or default)
    if sequences[0] != NOVEL_SEQUENCE:
        raise ValueError(f"sequences: the first must be {NOVEL_SEQUENCE!r}, where the bars are read; got {sequences}")
    # the bench reads fidelity only; quick learns the first QUICK_TASKS concepts (state 1, forgetting after state 2)
    base = replace(config or DemoConfig(), photos=False, progress=False, fidelity_only=True)
    if quick:
        base = replace(base, num_tasks=QUICK_TASKS)
    jobs = []
    for sequence in sequences:
        for seed in range(seeds):
            folder = Path(output_dir) / sequence / f"seed_{seed}"
            seeded = replace(base, sequence=sequence, seed=seed, output_dir=str(folder), methods=list(METHODS))
            tasks = write_concepts(seeded)
            jobs += [(sequence, seed, method, seeded, tasks, str(folder / method)) for method in METHODS]
    run_jobs(jobs, workers)
    rows = [{"sequence": sequence, "seed": seed, "method": method, "run_dir": run_dir,
             **fidelity_summary(Path(run_dir))} for sequence, seed, method, _, _, run_dir in jobs]
    stats = {sequence: {method: {metric: _mean_std([r[metric] for r in rows
                                                    if r["sequence"] == sequence and r["method"] == method])
                                 for metric in METRICS} for method in METHODS} for sequence in sequences}
    novel = stats[NOVEL_SEQUENCE]
    summary = {"state1_fidelity": novel["lora"]["state1"]["mean"], "lora_forgetting": novel["lora"]["forgetting"]["mean"],
               "ti_fidelity": novel["ti"]["plasticity"]["mean"], "joint_final_fidelity": novel["joint"]["final"]["mean"]}
    bars = _verdicts(novel)
    command = "dcfast bench world" + (" --quick" if quick else f" --seeds {seeds}") + "".join(
        f" --sequence {name}" for name in sequences if sequences != default)
    table = _table(stats)
    bar_lines = "\n".join(f"- {b['method']} {b['metric']} {b['bar']}: {b['value']:.3f} "
                          f"({'holds' if b['holds'] else 'FAILS'})" for b in bars)
    write_json_atomic(Path(output_dir) / "world.json", {"command": command, "rows": rows, "stats": stats,
                                                        "bars": bars, "summary": summary})
    scope = (f"its first {QUICK_TASKS} concepts, one seed: a smoke check; the bars are judged by `--seeds 3` on the "
             f"whole sequence" if quick else "the whole sequence")
    text = (f"`{command}` ({seeds} seed(s), mean ± std)\n\n{table}\nBars on `{NOVEL_SEQUENCE}` ({scope}):\n\n"
            f"{bar_lines}\n")
    write_atomic(Path(output_dir) / "world.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    return {"rows": rows, "stats": stats, "bars": bars, "summary": summary, "table": table}
