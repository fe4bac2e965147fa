"""Choose the world's training regime on the *validation* sequences (novel concepts):

    python scripts/world_regime.py [--sequences novel-same-class-val novel-distinct-class-val] [--seeds 0]
        [--method lora] [--variants ...] [--workers 2] [--output benchmarks/world_regime.md]

A novel concept (a shape the base model never saw) must be carried by the shared LoRA, as a face or a dog is on
Stable Diffusion: the regime is the one where sequential LoRA learns each concept (plasticity, mean F[i, i]) and
textual inversion (`--method ti`, the U-Net untouched) does not. Each variant is a set of TrainConfig values on
top of `dcfast.experiments.regimes.WORLD_TRAIN`; the table reports every concept's fidelity right after its own
task F[i, i], their mean (plasticity), fidelity forgetting over the first N-1 concepts, and final fidelity.

Run on validation sequences only: the regime is a hyperparameter; test sequences report.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

from dcfast.experiments.bench_methods import run_jobs
from dcfast.experiments.bench_world import fidelity_summary
from dcfast.experiments.regimes import WORLD_TRAIN
from dcfast.experiments.runner import DemoConfig, evaluation_config, write_concepts

ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
WIDE = ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]
# Every nn.Linear of the U-Net's blocks: the Fisher accumulator (EWC, EWC-DC) covers nn.Linear LoRA factors only,
# and conv1/conv2/proj_in/proj_out are Conv2d in the tiny base.
WIDE_LINEAR = ATTENTION + ["ff.net.0.proj", "ff.net.2", "time_emb_proj"]
# name -> TrainConfig values on top of WORLD_TRAIN (in the order they were tried; benchmarks/world_regime.md)
VARIANTS = {
    "200 steps, lora 1e-3, token 1e-3, rank 4 (known-world regime)": {
        "max_train_steps": 200, "learning_rate": 1e-3, "token_learning_rate": 1e-3, "rank": 4},
    "400 steps, lora 3e-3": {"max_train_steps": 400, "learning_rate": 3e-3, "token_learning_rate": 1e-3, "rank": 4},
    "400 steps, lora 3e-3, rank 16": {"max_train_steps": 400, "learning_rate": 3e-3, "token_learning_rate": 1e-3,
                                      "rank": 16},
    "400 steps, lora 3e-3, LoRA on attention, feed-forward, projections, resnet convs": {
        "max_train_steps": 400, "learning_rate": 3e-3, "token_learning_rate": 1e-3, "rank": 4, "target_modules": WIDE},
    "600 steps, lora 3e-3": {"max_train_steps": 600, "learning_rate": 3e-3, "token_learning_rate": 1e-3, "rank": 4},
    "400 steps, lora 3e-3, token 5e-3": {"max_train_steps": 400, "learning_rate": 3e-3, "token_learning_rate": 5e-3,
                                         "rank": 4},
    "600 steps, lora 3e-3, wide LoRA": {"max_train_steps": 600, "learning_rate": 3e-3, "token_learning_rate": 1e-3,
                                        "rank": 4, "target_modules": WIDE},
    "400 steps, lora 1e-2": {"max_train_steps": 400, "learning_rate": 1e-2, "token_learning_rate": 1e-3, "rank": 4},
    "1000 steps, lora 3e-3, wide LoRA": {"max_train_steps": 1000, "learning_rate": 3e-3, "token_learning_rate": 1e-3,
                                         "rank": 4, "target_modules": WIDE},
    "800 steps, lora 3e-3, wide LoRA, rank 16": {"max_train_steps": 800, "learning_rate": 3e-3,
                                                 "token_learning_rate": 1e-3, "rank": 16, "target_modules": WIDE},
    "600 steps, lora 3e-3, LoRA on every linear layer": {"max_train_steps": 600, "learning_rate": 3e-3,
                                                          "token_learning_rate": 1e-3, "rank": 4,
                                                          "target_modules": WIDE_LINEAR},
    "600 steps, lora 3e-3, wide LoRA, batch 8": {"max_train_steps": 600, "learning_rate": 3e-3,
                                                 "token_learning_rate": 1e-3, "rank": 4, "target_modules": WIDE,
                                                 "train_batch_size": 8},
    "1000 steps, lora 3e-3, wide LoRA, rank 8": {"max_train_steps": 1000, "learning_rate": 3e-3,
                                                 "token_learning_rate": 1e-3, "rank": 8, "target_modules": WIDE},
    "1000 steps, lora 5e-3, wide LoRA": {"max_train_steps": 1000, "learning_rate": 5e-3, "token_learning_rate": 1e-3,
                                         "rank": 4, "target_modules": WIDE},
    # round 4 (joint's final fidelity in the criterion): joint confused concept 1's colour at rank 8 (colour 0.53)
    "1000 steps, lora 3e-3, wide LoRA, rank 8, token 5e-3": {"max_train_steps": 1000, "learning_rate": 3e-3,
                                                             "token_learning_rate": 5e-3, "rank": 8,
                                                             "target_modules": WIDE},
    "1000 steps, lora 3e-3, wide LoRA, rank 16": {"max_train_steps": 1000, "learning_rate": 3e-3,
                                                  "token_learning_rate": 1e-3, "rank": 16, "target_modules": WIDE},
    "1000 steps, lora 5e-3, wide LoRA, rank 8": {"max_train_steps": 1000, "learning_rate": 5e-3,
                                                 "token_learning_rate": 1e-3, "rank": 8, "target_modules": WIDE},
    # round 5 (joint's own settings; a joint-only setting leaves sequential LoRA's row as it is): joint's four tokens
    # start equal on a same-class sequence, and it confused concept 1's colour with another's
    "1000 steps, lora 3e-3, wide LoRA, rank 8, joint tokens random": {
        "max_train_steps": 1000, "learning_rate": 3e-3, "token_learning_rate": 1e-3, "rank": 8, "target_modules": WIDE,
        "joint_token_init": "random"},
    # round 6 (joint's rate and schedule): a faster LoRA hurt joint most (round 4), and its 4000 steps run at a constant
    # rate; "cosine" decays each task's rate (a joint run is one phase, so its whole run)
    "1000 steps, lora 1e-3, wide LoRA, rank 8": {"max_train_steps": 1000, "learning_rate": 1e-3,
                                                 "token_learning_rate": 1e-3, "rank": 8, "target_modules": WIDE},
    "1000 steps, lora 3e-3, wide LoRA, rank 8, cosine": {"max_train_steps": 1000, "learning_rate": 3e-3,
                                                         "token_learning_rate": 1e-3, "rank": 8, "target_modules": WIDE,
                                                         "lr_scheduler": "cosine"},
}
# Every variant before round 6's cosine ran at a constant rate, WORLD_TRAIN's then: each names its schedule, so that its
# row is reproduced now that WORLD_TRAIN decays the rate. Every variant ran without prior preservation, which
# WORLD_TRAIN took later (2026-12-08), and names that too.
VARIANTS = {name: {"lr_scheduler": "constant", **values, "with_prior_preservation": False}
            for name, values in VARIANTS.items()}


def guidance_rows(run_dir: Path, guidances: List[float]) -> List[Dict[str, object]]:
    """The run's fidelity summary sampled at each classifier-free guidance (fidelity only, into eval-guidance-G/):
    the guidance is a sampling setting, read from one trained run."""
    from dcfast.eval.evaluation import evaluate
    from dcfast.eval.report import write_report

    rows = []
    for guidance in guidances:
        out = run_dir / f"eval-guidance-{guidance:g}"
        if not (out / "metrics.json").is_file():
            config = replace(evaluation_config(DemoConfig(progress=False, fidelity_only=True)), guidance_scale=guidance)
            write_report(evaluate(str(run_dir), num_images=config.num_images, config=config), out_dir=str(out))
        rows.append({"guidance": guidance, **fidelity_summary(run_dir, eval_dir=out.name)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", nargs="+", default=["novel-same-class-val"], help="validation sequences")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds")
    parser.add_argument("--method", default="lora", help="the method run with each variant (lora, ti, ...)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of the variants")
    parser.add_argument("--token_rates", type=float, nargs="*", default=[],
                        help="instead of --variants: the first variant at each of these token learning rates (ti's sweep)")
    parser.add_argument("--guidances", type=float, nargs="*", default=[],
                        help="also sample each finished run at these classifier-free guidances (a row each)")
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one torch thread each")
    parser.add_argument("--output", default="benchmarks/world_regime_rows.jsonl", help="JSON lines to append")
    parser.add_argument("--workdir", default="runs/world-regime", help="where the runs go")
    args = parser.parse_args(argv)
    bad = [s for s in args.sequences if not s.endswith("-val")]
    if bad:
        raise SystemExit(f"--sequences: {bad} are not validation sequences; tune on *-val only")
    variants = {name: VARIANTS[name] for name in args.variants}
    if args.token_rates:
        name, values = next(iter(variants.items()))
        variants = {f"{name}, token {rate:g}": {**values, "token_learning_rate": rate} for rate in args.token_rates}
    jobs = []
    for name, values in variants.items():
        for sequence in args.sequences:
            for seed in args.seeds:
                folder = Path(args.workdir) / sequence / name.replace(" ", "").replace(",", "_")[:80] / f"seed_{seed}"
                config = DemoConfig(methods=[args.method], sequence=sequence, seed=seed, progress=False,
                                    output_dir=str(folder), train_overrides=values, fidelity_only=True)
                jobs.append((sequence, seed, args.method, config, write_concepts(config), str(folder / args.method),
                             name))
    started = time.time()
    run_jobs([job[:6] for job in jobs], args.workers)
    with open(args.output, "a") as out:
        for sequence, seed, method, config, _, run_dir, name in jobs:
            row = {"variant": name, "values": {**WORLD_TRAIN, **config.train_overrides}, "sequence": sequence,
                   "seed": seed, "method": method, **fidelity_summary(Path(run_dir))}
            extra = [{**row, "variant": f"{name}, guidance {g['guidance']:g}", **g}
                     for g in guidance_rows(Path(run_dir), args.guidances)]
            for line in [row] + extra:
                out.write(json.dumps(line) + "\n")
                print(f"{line['variant']} | {sequence} | seed {seed} | {method} | F[i,i] "
                      f"{' '.join(f'{v:.2f}' for v in line['F_diag'])} | plasticity {line['plasticity']:.3f} "
                      f"| forgetting {line['forgetting']:.3f} | final {line['final']:.3f}", flush=True)
    print(f"{len(jobs)} runs in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
