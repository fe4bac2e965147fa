"""`dcfast demo`: the built-in demo, continual personalization of the shipped tiny model on the tiny world.

    dcfast demo [--method M | --all] [--sequence NAME | --photos] [--tasks N] [--output_dir DIR] [--max_train_steps S]
                [--arch sd | sdxl]

Wired into `dcfast/cli/main.py` with `add_parser(subparsers)`; `run(args)` does the work.
"""
from __future__ import annotations

import argparse

from dcfast.experiments.regimes import PHOTO_TRAIN, WORLD_TRAIN
from dcfast.experiments.runner import DEFAULT_METHOD, DemoConfig
from dcfast.world.scenes import SEQUENCES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on the `dcfast` command's subparsers."""
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo", help="train and evaluate the shipped tiny model on a tiny-world task sequence (CPU, no downloads)",
        description="Write a task sequence of the tiny world (or, with --photos, photo concepts), train it in "
                    "order on the tiny base model shipped in the package, evaluate every task state (concept "
                    "fidelity judged by the oracle, DC accuracy, MMD) and write the report.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--method", default=None,
                       help=f"lora | ewc | ewc-dc | dsc | dsc+ewc-dc | c-lora, or a control: ti | joint "
                            f"(default: {DEFAULT_METHOD})")
    which.add_argument("--all", action="store_true", help="every method, then a comparison table and plot")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sequence", default=defaults.sequence, choices=sorted(SEQUENCES),
                        help=f"the world's task sequence (default: {defaults.sequence})")
    source.add_argument("--photos", action="store_true",
                        help="photo concepts from scikit-image instead of the world (no fidelity: accuracy and MMD only)")
    parser.add_argument("--tasks", type=int, default=None,
                        help="concepts learned in sequence (default: the whole world sequence, or 3 photos of 6)")
    parser.add_argument("--output_dir", default=defaults.output_dir,
                        help=f"where concepts, runs and reports go (default: {defaults.output_dir})")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help=f"optimizer steps per task (default: {WORLD_TRAIN['max_train_steps']} on the world, "
                             f"{PHOTO_TRAIN['max_train_steps']} on photos)")
    parser.add_argument("--num_images", type=int, default=defaults.num_images,
                        help=f"generated images per (concept, task state) for MMD (default: {defaults.num_images})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of concepts, training and evaluation")
    parser.add_argument("--base_model", default=None,
                        help="diffusers model directory (default: the tiny model shipped in the package)")
    parser.add_argument("--arch", default="sd", choices=["sd", "sdxl"],
                        help="sd: the shipped tiny SD-layout base (default); sdxl: a tiny SDXL-layout model with random "
                             "weights built in code, to show SDXL end to end (its fidelity means nothing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where the reports are and the summary table."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from dcfast.experiments.runner import RANDOM_SDXL_NOTE, run_demo, tiny_sdxl_base
    from dcfast.training.methods import METHODS

    if args.arch == "sdxl" and args.base_model is not None:
        raise ValueError("--arch sdxl builds its own tiny SDXL base model; drop --base_model (an SDXL directory given "
                         "as --base_model is read as SDXL from its model_index.json)")
    base_model = str(tiny_sdxl_base(args.output_dir, args.seed)) if args.arch == "sdxl" else args.base_model
    if args.arch == "sdxl":
        print(f"demo --arch sdxl: {RANDOM_SDXL_NOTE}")

    for library in (diffusers_logging, transformers_logging):  # the demo's own progress, not loaders' chatter
        library.set_verbosity_error()
        library.disable_progress_bar()

    methods = list(METHODS) if args.all else [args.method or DEFAULT_METHOD]
    config = DemoConfig(output_dir=args.output_dir, methods=methods, sequence=args.sequence, photos=args.photos,
                        num_tasks=args.tasks,
                        max_train_steps=args.max_train_steps, num_images=args.num_images, seed=args.seed,
                        base_model=base_model or DemoConfig().base_model, progress=not args.quiet)
    result = run_demo(config)
    print()
    for r in result["runs"]:
        print(f"report ({r['method']}): {r['report']['report']}")
    if result["compare"]:
        print(f"comparison: {result['compare']['table']} and {result['compare']['plot']}")
    print()
    print(result["table"])
    return 0
