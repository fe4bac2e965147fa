"""`dcfast bench world`: does sequential LoRA forget on the tiny world? (the yardstick's own check)

Sequential LoRA (`lora`) learns the same-class test sequence (four stars, `dcfast.world.scenes`) with the
world's training settings (`dcfast.experiments.regimes.WORLD_TRAIN`), then every task state is evaluated. Concept 1
must be learned (F[1, 1] high) and then lost (F[1, 1] - F[1, N] large): a testbed where nothing is
forgotten cannot rank methods. `--quick` runs seed 0; the full run averages 3 seeds.

The closing line is `state1_fidelity=<F[1,1]> final_fidelity=<F[1,N]> lora_forgetting=<F[1,1]-F[1,N]>`
(means over seeds); the whole fidelity matrices and the standard summaries (final fidelity, BwT,
forgetting over the first N-1 concepts) go to `world.json` under the output folder.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, Optional

from dcfast.io.atomic import write_json_atomic
from dcfast.experiments.runner import DemoConfig, replace, run_method, write_concepts

SEQUENCE = "same-class-test"


def run(quick: bool = False, device: str = "cpu", seeds: int = 3, output_dir: str = "dcfast-bench-world",
        config: Optional[DemoConfig] = None) -> Dict[str, object]:
    """Sequential LoRA on the same-class test sequence for `seeds` seeds (1 with `quick`).

    Returns {"rows": per seed (fidelity matrix and summary), "summary": means of state1_fidelity,
    final_fidelity, lora_forgetting and the run summaries' fidelity metrics}.
    """
    if device != "cpu":
        raise ValueError(f"device: `dcfast bench world` runs on the CPU; got {device!r}")
    if seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {seeds}")
    seeds = 1 if quick else seeds
    base = replace(config or DemoConfig(), sequence=SEQUENCE, photos=False, output_dir=output_dir)
    rows = []
    for seed in range(seeds):
        seeded = replace(base, seed=seed, output_dir=str(Path(output_dir) / f"seed_{seed}"))
        tasks = write_concepts(seeded)
        result = run_method(seeded, "lora", tasks, str(Path(seeded.output_dir) / "lora"))
        fidelity = json.loads(Path(result["report"]["metrics"]).read_text())["fidelity"]["all"]
        first = fidelity[0]
        rows.append({"seed": seed, "run_dir": result["run_dir"], "fidelity": fidelity,
                     "state1_fidelity": first[0], "final_fidelity": first[-1], "lora_forgetting": first[0] - first[-1],
                     "summary": result["summary"]})
    keys = ("state1_fidelity", "final_fidelity", "lora_forgetting")
    summary = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    summary.update({f"{k}_std": statistics.stdev(r[k] for r in rows) if len(rows) > 1 else 0.0 for k in keys})
    for key in ("final_fidelity", "bwt_fidelity", "fidelity_forgetting"):
        summary[f"run_{key}"] = statistics.fmean(r["summary"][key] for r in rows)
    command = "dcfast bench world" + (" --quick" if quick else f" --seeds {seeds}")
    write_json_atomic(Path(output_dir) / "world.json", {"command": command, "sequence": SEQUENCE, "rows": rows,
                                                        "summary": summary})
    for r in rows:
        print(f"seed {r['seed']}: F[1, 1..N] = {[round(v, 3) for v in r['fidelity'][0]]}")
    return {"rows": rows, "summary": summary}
