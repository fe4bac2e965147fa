"""Tune the continual-personalization methods on the world's *validation* sequences only:

    python scripts/tune_methods.py --grid lambda [--sequence known-same-class-val] [--seeds 0] [--workers 2]
    python scripts/tune_methods.py --preset equal      # the methods issue's equal tuning on the novel world
    python scripts/tune_methods.py --rank ROWS.jsonl --grid equal-ewc [--sequence ...] [--seeds ...]  # the rule's order
    python scripts/tune_methods.py --grid equal-ewc --no-prior ...   # without prior preservation (run or --rank)

Issue 11's protocol: every hyperparameter (lambda, delta, tau, push variant, alpha, beta, M, k, T, C-LoRA's
lambda) is chosen here, on validation sequences, and `dcfast bench methods --seeds 3` then reports the
test sequences once. Each grid is a list of (method, TrainConfig overrides) on top of the world regime
(`dcfast.experiments.regimes.WORLD_TRAIN`); each row is one full run (4 tasks, every state evaluated), judged by the
oracle's fidelity matrix F (dcfast.world.oracle).

The selection rule, fixed before any run: the highest **final fidelity** (mean over concepts of F[i, N],
what the user has at the end), ties (within 1/32, one sample) broken by the lower fidelity forgetting.
Forgetting alone would crown a method that learns nothing after task 1.

Rows append to `<workdir>/rows.jsonl` as runs finish, so a killed sweep resumes where it stopped (rows
already there are skipped); the markdown table of every row is rewritten at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Tuple

from dcfast.io.atomic import write_atomic

Variant = Tuple[str, Dict[str, object]]  # (method, TrainConfig overrides)

GRIDS: Dict[str, List[Variant]] = {
    # Penalty weights: EWC and EWC-DC on the same mean-normalised Fisher.
    "lambda": [("lora", {})]
    + [("ewc", {"ewc_lambda": v}) for v in (0.01, 0.1, 1.0, 10.0)]
    + [("ewc-dc", {"ewc_lambda": v, "delta": 0.1}) for v in (0.01, 0.1)],  # delta: the default then
    # EWC-DC's DC term at lambda = 1 (EWC's plateau). At the provisional defaults (delta 0.1, complement
    # push, auto tau ~ 5e-4..1e-3) with lambda 0.01 or 0.1 it learned no concept after the first
    # (F[i, i] <= 0.16): the term's gradient is ~delta / tau ~ 100-200x the denoising loss's, so it
    # drowns the loss it should regularise. delta ~ tau puts the two on one scale.
    "dc-term": [("ewc-dc", {"ewc_lambda": 1.0, **change}) for change in (
        {"delta": 1e-3}, {"delta": 1e-4}, {"delta": 1e-3, "dc_push": "none"}, {"delta": 1e-3, "dc_push": "spec"})],
    # DSC at its former default alpha = 1 (beta = 1, M = a third of the task's steps) and with the DC-score KL
    # (its logits are also errors / tau) on the tau scale like EWC-DC's delta; DSC+EWC-DC with both there.
    "dsc": [("dsc+ewc-dc", {"ewc_lambda": 1.0, "delta": 1e-3, "dsc_alpha": 1e-3}), ("dsc", {"dsc_alpha": 1.0}),
            ("dsc", {"dsc_alpha": 1e-3})],
    # DSC's distillation length M (dsc_iterations; default 66, a third of a task's 200 steps). Measured on
    # known-same-class-val and known-same-class-test seed 0 (scripts/dsc_distill_effect.py): before task 4's distillation
    # the last-trained colour has overwritten the earlier stars (drawn yellow), 66 iterations over three
    # teachers (~22 each) restore some and not others, and the teacher MSE is still falling at the end.
    "dsc-iterations": [("dsc", {"dsc_alpha": 1e-3, "dsc_iterations": 200})],
    # EWC-DC's cost against quality (issue 11): k concepts x T pairs per image per step, at the chosen delta and
    # lambda; (4, 4), the default, is the dc-term grid's first row.
    "dc-cost": [("ewc-dc", {"ewc_lambda": 1.0, "delta": 1e-3, "num_dc_concepts": k, "num_dc_timesteps": t})
                for k, t in ((2, 1), (3, 2))],
    # EWC-DC's remaining shape settings, one change each from the chosen (lambda 1, delta 1e-3) row of dc-term:
    # tau's scale (with delta fixed, a smaller tau also strengthens the term, ~delta / tau), the pull's label
    # smoothing, c_0's push weight, and the online Fisher decay gamma.
    "ewc-dc-shape": [("ewc-dc", {"ewc_lambda": 1.0, "delta": 1e-3, **change}) for change in (
        {"auto_temperature_scale": 0.3}, {"auto_temperature_scale": 3.0}, {"dc_label_smoothing": 0.1},
        {"dc_c0_weight": 0.3}, {"dc_c0_weight": 3.0}, {"gamma": 0.5}, {"gamma": 1.0})],
    # DSC's remaining settings, one change each from the chosen (alpha 1e-3) row of dsc: the noise terms' weight
    # beta, the teacher pool, and its cost (k, T); then whether DSC+EWC-DC's penalty applies while distilling.
    "dsc-shape": [("dsc", {"dsc_alpha": 1e-3, **change}) for change in (
        {"dsc_beta": 0.1}, {"dsc_beta": 10.0}, {"dsc_teacher_pool": "after_distill"},
        {"num_dc_concepts": 2, "num_dc_timesteps": 1}, {"num_dc_concepts": 3, "num_dc_timesteps": 2})]
    + [("dsc+ewc-dc", {"ewc_lambda": 1.0, "delta": 1e-3, "dsc_alpha": 1e-3, "dsc_ewc_penalty": False})],
    # A setting that wins ewc-dc-shape on known-same-class-val only by the selection rule's tie-break (within one sample
    # on final fidelity, one sample less forgetting) must also hold on the second validation sequence,
    # known-distinct-class-val, against the default, before it replaces the default.
    "confirm-tau": [("ewc-dc", {"ewc_lambda": 1.0, "delta": 1e-3}),
                    ("ewc-dc", {"ewc_lambda": 1.0, "delta": 1e-3, "auto_temperature_scale": 3.0})],
    # DSC at (k, T) = (3, 2) beat the default (4, 4) on known-same-class-val by 0.055 (under two samples per concept):
    # a change of a shared default on one seed of one sequence, checked the same way.
    "confirm-dsc-cost": [("dsc", {"dsc_alpha": 1e-3}),
                         ("dsc", {"dsc_alpha": 1e-3, "num_dc_concepts": 3, "num_dc_timesteps": 2})],
    # C-LoRA's lambda: its penalty sums products of two LoRA-sized weights (~1e-2 each here), so its
    # useful range is far above EWC's.
    "c-lora": [("c-lora", {"clora_lambda": v}) for v in (1e2, 1e4, 1e6)],
}

# Equal tuning on the novel world (the methods issue): every method at most EQUAL_BUDGET configurations, each run
# on both novel validation sequences and seeds 0 and 1 (`--preset equal`). The rule, fixed before any run: the
# highest final fidelity averaged over the four runs; within 1/32 of it, the lower mean fidelity forgetting; then
# the configuration listed first (the spec's or today's default). `joint` is the offline upper bound at the
# world regime, not tuned.
EQUAL_BUDGET = 8
# lambda on the mean-normalised Fisher and on the raw one. Changed after the first rows (benchmarks/methods_tuning.md):
# lambda 1 (mean) already pinned the LoRA after task 1 under EWC-DC and EWC, 1e4 moved it by 0.04 against 30 in task 1,
# and the raw DC F_n measured ~3e-6 (task 1), so mean 1e2 / 1e4 repeated raw 1e6 / 1e8 and raw 1e10 lay beyond:
# they gave way to the low end, 1e-3 and 1e-4 (mean), and raw 1e2 (~mean 3e-4). After those rows (seed 0 of
# novel-same-class-val): both families erase the previous concept at every lambda up to 1e-2 (mean) and pin the LoRA
# from 1 (mean) and raw 1e6 on, so the cliff lies between 1e-2 and 1. Raw 1e2 (~mean 3e-4, inside the erasing range)
# and raw 1e8 (beyond raw 1e6, which pinned) gave way, before they ran, to mean 0.3 and 0.1, inside the cliff.
LAMBDAS = ([{"ewc_lambda": v, "fisher_normalize": "mean"} for v in (1.0, 0.3, 0.1, 1e-2, 1e-3, 1e-4)]
           + [{"ewc_lambda": v, "fisher_normalize": "none"} for v in (1e4, 1e6)])
EQUAL_GRIDS: Dict[str, List[Variant]] = {
    "equal-lora": [("lora", {})],  # nothing of its own to tune
    "equal-ti": [("ti", {"token_learning_rate": v}) for v in (1e-3, 3e-4, 3e-3, 1e-2, 3e-2)],
    "equal-ewc": [("ewc", dict(values)) for values in LAMBDAS],
    "equal-ewc-dc": [("ewc-dc", dict(values)) for values in LAMBDAS],
    # DSC: the methods issue's three remedies for its forgetting inside the budget (changed before any DSC row ran):
    # more distillation steps M after the task (the spec's schedule, T1 = LoRA_n anchoring the newest concept), every
    # earlier teacher each step, and distillation interleaved with the task's training. The spec's row first, then
    # each remedy alone (so `--first 4` judges them), then their combinations. The seventh, every teacher at M 1000,
    # gave way (after the first two rows, before it ran) to M 333 at a tenth of the world's rate: the distillation's
    # fresh AdamW at the world's 3e-3 left the student far from T1 (noise MSE to T1 0.23 after task 2's distillation,
    # against that task's final denoising loss 0.06) and erased the newest concept (F[n, n] 0.00-0.19 at M 50 and 333).
    "equal-dsc": [("dsc", dict(values)) for values in (
        {"dsc_teachers": "one", "dsc_iterations": 50}, {"dsc_teachers": "one", "dsc_iterations": 333},
        {"dsc_teachers": "all", "dsc_iterations": 50}, {"dsc_teachers": "one", "dsc_schedule": "interleaved"},
        {"dsc_teachers": "one", "dsc_iterations": 1000}, {"dsc_teachers": "all", "dsc_iterations": 333},
        {"dsc_teachers": "one", "dsc_iterations": 333, "dsc_learning_rate": 3e-4},
        {"dsc_teachers": "all", "dsc_schedule": "interleaved"})],
    "equal-dsc+ewc-dc": [("dsc+ewc-dc", {"ewc_lambda": lam, "dsc_teachers": teachers, "dsc_iterations": m})
                         for lam in (1.0, 1e-2) for teachers in ("one", "all") for m in (333, 1000)],
    "equal-c-lora": [("c-lora", {"clora_lambda": lam, "clora_token_init": start, "clora_scope": scope})
                     for start in ("random", "class_word") for scope in ("all", "cross_kv") for lam in (1e4, 1e2)],
    "equal-custom-diffusion": [("custom-diffusion", {"learning_rate": lr, "token_learning_rate": token})
                               for lr in (3e-3, 1e-3, 1e-2) for token in (1e-3, 5e-3)],
}
assert all(len(grid) <= EQUAL_BUDGET for grid in EQUAL_GRIDS.values())
GRIDS.update(EQUAL_GRIDS)
# The cost lever the methods issue names first: EWC-DC's DC term every m steps (at m times the weight), at
# equal-ewc-dc's first configuration. Run 2026-12-07 (benchmarks/methods_tuning.md) at the constant rate of the world
# regime then; the world now takes dc_every 4 for EWC-DC (WORLD_METHOD_TRAIN) and a cosine rate, so each row names both.
GRIDS["novel-dc-every"] = [("ewc-dc", {**LAMBDAS[0], "dc_every": m, "lr_scheduler": "constant"}) for m in (1, 4)]
# The methods issue's cause 2 at the current regime: task 2's DC Fisher taken where every image has p(c_2) > 1 - 1e-6.
# EWC-DC at equal-ewc-dc's first configuration with the Fisher at a tau re-measured on the trained model.
# Its first row (lambda 1) tied the default: the pinning dominated. At lambda 0.1 (mean) EWC-DC kept concepts 1 and 2
# after task 2 (F 0.88, 0.88), then learned nothing in task 3 and lost concept 2 (0.22), with task 2's Fisher taken
# where every image was saturated (raw mean 2e-97): the rows at 0.1 and 0.3 with the Fisher at the re-measured tau.
GRIDS["novel-fisher-tau"] = [("ewc-dc", {**values, "fisher_temperature": "task_end"}) for values in LAMBDAS[:3]]
# The penalty a task meets grows with the tasks held under fisher_normalize "mean" (mean 1.9 at task 3 for gamma
# 0.9). EWC-DC at lambda 0.1, Fisher at the re-measured tau, kept concepts 1 and 2 through task 2 (0.84, 0.88) and then
# learned nothing in task 3: the same rows with the merged Fisher held at mean 1 ("merged").
GRIDS["novel-fisher-merged"] = [("ewc-dc", {**values, "fisher_normalize": "merged", "fisher_temperature": "task_end"})
                                for values in LAMBDAS[1:3]]
# Forgetting on novel concepts is overwriting (final overwrite 0.93 for EWC at lambda 1e-4, ~sequential LoRA): the
# learned tokens lie 0.10-0.17 apart at the regime's token rate 1e-3, so the prompts barely differ. Does a faster token
# make the conditions distinct enough for the LoRA to key on? Sequential LoRA at the regime's rate and 10x / 30x it,
# and EWC-DC at lambda 1e-3 (mean; it learns, overwrite 0.27 at 1e-3) at 30x. Rule, before the rows: if a rate lowers
# sequential LoRA's final overwrite by at least 0.25 with its mean F[i, i] at most 1/32 lower, the regime's token rate
# (every method but ti, which tunes its own) is re-chosen on both validation sequences; otherwise it stays.
GRIDS["novel-token-rate"] = ([("lora", {"token_learning_rate": v}) for v in (1e-3, 1e-2, 3e-2)]
                             + [("ewc-dc", {**LAMBDAS[4], "token_learning_rate": 3e-2})])
# Every world run draws its newest concept for every prompt, the base model's own words included ("a photo of a red
# triangle" -> the pink chevron after sequential LoRA; scripts/oracle_readings.py --prompt): the LoRA stops following
# the text, so no penalty on the personal prompts can keep an earlier concept. DreamBooth's prior preservation (the
# base model's class images learned beside each task) keeps the class word's meaning. Rule, before the rows: if it
# lowers sequential LoRA's final overwrite by at least 0.25 with mean F[i, i] >= 0.8 (the yardstick's plasticity bar),
# or raises a continual method's final fidelity by at least 1/8 over the same configuration without it, the world
# regime gains it for every method that trains the U-Net (yardstick and equal sweep rerun); otherwise it stays off.
GRIDS["novel-prior"] = [(method, {**values, "with_prior_preservation": True}) for method, values in (
    ("lora", {}), ("ewc-dc", LAMBDAS[4]), ("ewc", LAMBDAS[4]), ("dsc", {"dsc_teachers": "one", "dsc_iterations": 50}))]
# Sequential LoRA with the prior met novel-prior's rule (overwrite 0.90 -> 0.00 at mean F[i, i] 0.93), so the world
# regime is to gain it; before that, the yardstick's upper bound must still reach its bar (joint's final fidelity
# >= 0.8 on validation, as round 6 of benchmarks/world_regime.md asked of the regime).
GRIDS["novel-prior-joint"] = [("joint", {"with_prior_preservation": True})]
# With the prior the upper bound missed its bar on the test sequence (joint 0.724 < 0.8, benchmarks/world/
# yardstick-prior.md): in two seeds of three it drew the heart in another concept's colour, the four tokens starting
# equal at "circle" and drifting apart at the token rate 1e-3 (1e-2 puts sequential LoRA's tokens 1.1-1.4 apart).
# Joint's own token settings, on validation only: the regime's, a 3x and a 10x token rate, and random starts (round 5
# of world_regime.md: they fixed the colour confusion and cost shape, 0.64 against 0.77, before the prior). Rule,
# before the rows: run on novel-same-class-val seeds 0 and 1 and novel-distinct-class-val seed 0 (where joint drew
# 0.26 without the prior); the highest mean final fidelity wins, the regime's row staying within 1/32 of it;
# a winner enters WORLD_METHOD_TRAIN["joint"] and the yardstick reruns joint.
GRIDS["novel-prior-joint-tokens"] = [("joint", values) for values in (
    {}, {"token_learning_rate": 3e-3}, {"token_learning_rate": 1e-2}, {"joint_token_init": "random"})]
PRESETS = {"equal": (list(EQUAL_GRIDS), ["novel-same-class-val", "novel-distinct-class-val"], [0, 1])}


def with_prior(grid: List[Variant], on: bool = True) -> List[Variant]:
    """The grid with prior preservation named, on or off, in every configuration of a method that trains the U-Net
    (ti has nothing to preserve). The world regime took it on 2026-12-08 (WORLD_TRAIN), after rows of every grid had
    run without it under names that do not mention it: naming it tells the two regimes' rows apart, and a grid's rows
    are skipped as done only where the setting matches."""
    from dcfast.training.methods import get_method

    return [(m, {**o, "with_prior_preservation": on} if get_method(m).trains_lora else o) for m, o in grid]


def variant_name(method: str, overrides: Dict[str, object]) -> str:
    return method + "".join(f" {k}={v}" for k, v in sorted(overrides.items()))


def run_variant(method: str, overrides: Dict[str, object], sequence: str, seed: int, workdir: str,
                fidelity_images: int) -> Dict[str, object]:
    """One full run (train every task, evaluate every state) on one thread; the fidelity row of it."""
    import torch

    torch.set_num_threads(1)
    from dcfast.experiments.runner import DemoConfig, run_method, write_concepts

    name = variant_name(method, overrides)
    folder = Path(workdir) / sequence / f"seed_{seed}" / name.replace(" ", "_").replace("=", "-")
    started = time.time()
    config = DemoConfig(methods=[method], sequence=sequence, seed=seed, progress=False, output_dir=str(folder),
                        train_overrides=dict(overrides), fidelity_images=fidelity_images, fidelity_only=True)
    tasks = write_concepts(config)
    result = run_method(config, method, tasks, str(folder / "run"), log=lambda line: None)
    data = json.loads(Path(result["report"]["metrics"]).read_text())
    matrix = data["fidelity"]["all"]
    summary = data["summary"]
    return {"variant": name, "method": method, "overrides": overrides, "sequence": sequence, "seed": seed,
            "F11": matrix[0][0], "F1N": matrix[0][-1], "F_diag": [matrix[i][i] for i in range(len(matrix))],
            "final_fidelity": summary["final_fidelity"], "fidelity_forgetting": summary["fidelity_forgetting"],
            "plasticity": summary.get("plasticity"), "final_overwrite": summary.get("final_overwrite"),
            "final_base_fidelity": summary.get("final_base_fidelity"),
            "bwt_fidelity": summary["bwt_fidelity"], "ammd": summary.get("ammd"),
            "final_accuracy": summary.get("final_accuracy"), "train_seconds": result["summary"]["train_seconds"],
            "seconds": time.time() - started, "run_dir": result["run_dir"], "tasks": task_records(result["run_dir"]),
            "base_model_fingerprint": json.loads((Path(result["run_dir"]) / "run.json").read_text())["base_model_fingerprint"]}


# What each task's metrics.json records of what moved and of the Fisher (the methods issue's items 2 and 3), per row.
TASK_RECORDS = ("lora_change", "token_change", "temperature", "fisher_raw_mean", "fisher_saturated_fraction",
                "fisher_temperature")


def task_records(run_dir: str) -> List[Dict[str, object]]:
    """TASK_RECORDS of every finished task of a run, in task order (the keys a task's method recorded)."""
    from dcfast.io.runs import Run

    run = Run(run_dir)
    return [{key: metrics[key] for key in TASK_RECORDS if key in metrics}
            for metrics in map(run.metrics, run.finished_tasks())]


TIE = 1 / 32  # one sample of the 32 the oracle judges per (concept, state)


def rank(rows: List[Dict[str, object]], grid: List[Variant]) -> List[Dict[str, object]]:
    """The grid's configurations that have rows, best first by the selection rule: the highest mean final fidelity
    over their runs; within TIE of it, the lower mean fidelity forgetting; then the one listed first in the grid.
    Each entry: position in the grid (from 1), variant, runs, mean final fidelity, mean fidelity forgetting."""
    entries = []
    for position, (method, overrides) in enumerate(grid, start=1):
        runs = [r for r in rows if r["variant"] == variant_name(method, overrides)]
        if runs:
            entries.append({"position": position, "variant": runs[0]["variant"], "runs": len(runs),
                            "final_fidelity": sum(r["final_fidelity"] for r in runs) / len(runs),
                            "fidelity_forgetting": sum(r["fidelity_forgetting"] for r in runs) / len(runs)})
    ranked = []
    while entries:
        best = max(e["final_fidelity"] for e in entries)
        near = [e for e in entries if e["final_fidelity"] >= best - TIE]
        chosen = min(near, key=lambda e: (e["fidelity_forgetting"], e["position"]))
        ranked.append(chosen)
        entries.remove(chosen)
    return ranked


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| variant | sequence | seed | F[1,1] | F[1,N] | F[i,i] | final fidelity | fidelity forgetting | "
             "train s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['sequence']} | {r['seed']} | {r['F11']:.3f} | {r['F1N']:.3f} | "
              f"{' '.join(f'{v:.2f}' for v in r['F_diag'])} | {r['final_fidelity']:.3f} | "
              f"{r['fidelity_forgetting']:.3f} | {r['train_seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", default=[], help=f"grids to run: {', '.join(GRIDS)}")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="equal: every equal-* grid on both novel validation sequences, seeds 0 and 1")
    parser.add_argument("--sequence", nargs="+", default=["known-same-class-val"], help="validation sequences")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--first", type=int, default=None,
                        help="only each grid's first N configurations (a sweep in parts; the rest resume later)")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="only these configurations of each grid, by position from 1 (a sweep in parts)")
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--fidelity_images", type=int, default=32, help="samples per (concept, state) the oracle judges")
    parser.add_argument("--workdir", default="runs/tune", help="runs and rows.jsonl go here")
    parser.add_argument("--output", default=None, help="markdown table of every row (default: <workdir>/tuning.md)")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                        help="prior preservation in every configuration of a method that trains the U-Net, named in its "
                             "variant (the world regime's; --no-prior: off, as every row before 2026-12-08 ran)")
    parser.add_argument("--rank", metavar="ROWS", default=None,
                        help="run nothing: order each --grid's configurations by the rule over the rows of this "
                             "rows.jsonl on --sequence and --seeds")
    args = parser.parse_args(argv)
    if args.preset:
        args.grid, args.sequence, args.seeds = (list(v) for v in PRESETS[args.preset])
    if not args.grid:
        raise SystemExit("give --grid GRID ... or --preset equal")
    unknown = [g for g in args.grid if g not in GRIDS]
    if unknown:
        raise SystemExit(f"--grid: unknown {unknown}; known: {', '.join(GRIDS)}")
    not_val = [s for s in args.sequence if not s.endswith("-val")]
    if not_val:
        raise SystemExit(f"--sequence: {not_val} are not validation sequences; tune on *-val only")
    grids = {g: with_prior(GRIDS[g], args.prior) for g in args.grid}
    if args.rank:
        if not Path(args.rank).is_file():
            raise SystemExit(f"--rank: no rows file {args.rank}; give a rows.jsonl that tune_methods.py wrote")
        rows = [json.loads(line) for line in Path(args.rank).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["sequence"] in args.sequence and r["seed"] in args.seeds]
        for g in args.grid:
            print(f"{g}: position, variant, runs, mean final fidelity, mean fidelity forgetting (best first)")
            for e in rank(rows, grids[g]):
                print(f"  {e['position']}  {e['variant']}  {e['runs']}  {e['final_fidelity']:.3f}  "
                      f"{e['fidelity_forgetting']:.3f}")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = Path(args.workdir) / "rows.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["variant"], r["sequence"], r["seed"]) for r in rows}
    outside = [(g, i) for g in args.grid for i in args.only or () if not 1 <= i <= len(GRIDS[g])]
    if outside:
        raise SystemExit(f"--only: no such configuration {outside}; positions run from 1 to the grid's length")
    chosen = {g: [v for i, v in enumerate(grids[g][:args.first], start=1) if args.only is None or i in args.only]
              for g in args.grid}
    jobs = [(m, o, s, seed) for g in args.grid for m, o in chosen[g] for s in args.sequence
            for seed in args.seeds if (variant_name(m, o), s, seed) not in done]
    print(f"{len(jobs)} runs to do ({len(done)} already in {log})", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_variant, m, o, s, seed, args.workdir, args.fidelity_images) for m, o, s, seed in jobs]
        for future in as_completed(futures):
            row = future.result()
            rows.append(row)
            with open(log, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("variant", "sequence", "seed", "F11", "F1N", "final_fidelity",
                                                  "fidelity_forgetting", "seconds")}), flush=True)
    output = Path(args.output or Path(args.workdir) / "tuning.md")
    write_atomic(output, lambda tmp: Path(tmp).write_text(table(rows) + "\n"))
    print(table(rows))


if __name__ == "__main__":
    main()
