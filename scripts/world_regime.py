"""Measure the world's training regime for sequential LoRA on a *validation* sequence:

    python scripts/world_regime.py [--sequence same-class-val] [--seeds 0] [--output benchmarks/world_regime.md]

Issue 10: on the previous base model the concept lived in the frozen per-task token (textual inversion)
and the shared LoRA barely moved, so nothing later tasks did could erase it. On Stable Diffusion,
forgetting comes from the shared LoRA carrying the concepts. Each variant below changes one setting of
the world regime (`dcfast.experiments.regimes.WORLD_TRAIN`) and reports F[1, 1] (concept 1 learned), F[1, N] (what
is left of it at the end), their difference (forgetting of concept 1), every concept's fidelity right
after its own task F[i, i] (was it learned?) and the mean final fidelity, so each setting's
contribution shows.

Run on a validation sequence only: the regime is a hyperparameter; test sequences report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dcfast.io.atomic import write_atomic
from dcfast.experiments.regimes import WORLD_TRAIN
from dcfast.experiments.runner import DemoConfig, run_method, write_concepts

# name -> TrainConfig overrides on top of WORLD_TRAIN
VARIANTS = {
    "world regime": {},
    "TrainConfig rates (lora 1e-4, token 5e-3)": {"learning_rate": 1e-4, "token_learning_rate": 5e-3},
    "token only (lora lr 1e-7)": {"learning_rate": 1e-7},
    "lora only (token lr 1e-7)": {"token_learning_rate": 1e-7},
    "half the steps": {"max_train_steps": WORLD_TRAIN["max_train_steps"] // 2},
    "twice the steps": {"max_train_steps": WORLD_TRAIN["max_train_steps"] * 2},
    "rank 16": {"rank": 16},
    "lora lr 3e-3": {"learning_rate": 3e-3},
    "LoRA on attention, feed-forward and time-embedding projections": {
        "target_modules": ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj"]},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequence", default="same-class-val", help="a validation sequence of dcfast.world.scenes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to average")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of the variants")
    parser.add_argument("--output", default="benchmarks/world_regime.md", help="markdown table to write")
    parser.add_argument("--workdir", default="runs/world-regime", help="where the runs go")
    parser.add_argument("--base_model", default=None, help="diffusers model dir (default: the shipped tiny base)")
    parser.add_argument("--fidelity_images", type=int, default=32, help="samples per (concept, state) the oracle judges")
    args = parser.parse_args(argv)
    if not args.sequence.endswith("-val"):
        raise SystemExit(f"--sequence: {args.sequence!r} is not a validation sequence; tune on *-val only")
    rows = []
    for name in args.variants:
        for seed in args.seeds:
            started = time.time()
            config = DemoConfig(methods=["lora"], sequence=args.sequence, seed=seed, progress=False,
                                output_dir=str(Path(args.workdir) / name.split(" (")[0].replace(" ", "-") / f"seed_{seed}"),
                                train_overrides=VARIANTS[name], fidelity_images=args.fidelity_images,
                                **({"base_model": args.base_model} if args.base_model else {}))
            tasks = write_concepts(config)
            result = run_method(config, "lora", tasks, str(Path(config.output_dir) / "lora"), log=lambda line: None)
            data = json.loads(Path(result["report"]["metrics"]).read_text())
            first = data["fidelity"]["all"][0]
            rows.append({"variant": name, "seed": seed, "F11": first[0], "F1N": first[-1], "drop": first[0] - first[-1],
                         "final": data["summary"]["final_fidelity"], "seconds": time.time() - started,
                         "F_row1": first, "F_diag": [data["fidelity"]["all"][i][i] for i in range(len(first))]})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"`python scripts/world_regime.py --sequence {args.sequence} --seeds {' '.join(map(str, args.seeds))}` "
             f"(sequential LoRA; world regime {WORLD_TRAIN})", "",
             "| variant | seed | F[1,1] | F[1,N] | F[1,1]−F[1,N] | F[i,i] | final fidelity | s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['F11']:.3f} | {r['F1N']:.3f} | {r['drop']:.3f} | "
              f"{' '.join(f'{v:.2f}' for v in r['F_diag'])} | {r['final']:.3f} | {r['seconds']:.0f} |" for r in rows]
    write_atomic(args.output, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
