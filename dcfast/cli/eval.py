"""`dcfast eval`: evaluate a run (accuracy, MMD, I2I and, on world runs, fidelity matrices) and write its report.

    dcfast eval --run OUTPUT_DIR [--features PATH] [--num_images M] [--compare RUN ...]

`dcfast/cli/main.py` calls `add_parser(subparsers)`; `run(args)` does the work.
"""
from __future__ import annotations

import argparse
import os

DEFAULT_STAGES_TEXT = "8:2,32:1"  # = dcfast.eval.classify.DEFAULT_STAGES (written out: no torch import for --help)


def _stages(text: str):
    try:
        stages = tuple(tuple(int(v) for v in stage.split(":")) for stage in text.split(","))
        if any(len(s) != 2 for s in stages):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stages must look like '8:2,32:1' (pairs:keep per stage), got {text!r}")
    return stages


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="evaluate a continual-personalization run and write its report",
                              description="Accuracy, MMD (and CLIP I2I) matrices of every task state, AMMD, BwT-MMD, "
                                          "forgetting; on tiny-world runs also the concept-fidelity matrices judged "
                                          "by the oracle (final fidelity, BwT, forgetting); writes OUTPUT_DIR/eval/ "
                                          "(metrics.json, report.md, PNGs).")
    p.add_argument("--run", required=True, help="the run's output_dir (holds task_1/ ... task_N/)")
    p.add_argument("--features", default=None,
                   help="local CLIP vision model dir, an SD 1.x safety_checker/ folder or SD 1.x root; "
                        "default: the deterministic random-conv features (named in the report)")
    p.add_argument("--num_images", type=int, default=8, help="generated images per (concept, task state) for MMD")
    p.add_argument("--fidelity_images", type=int, default=32,
                   help="world runs: generated images per (concept, task state) the oracle judges")
    p.add_argument("--num_inference_steps", type=int, default=20, help="DDIM steps for generation")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's validation_guidance_scale, 5 on tiny-world "
                        "runs of the demo, else 7.5)")
    p.add_argument("--fidelity_only", action="store_true",
                   help="tiny-world runs: the oracle's fidelity matrices only, no DC accuracy or MMD (about half the time)")
    p.add_argument("--max_eval_images", type=int, default=8, help="cap on real held-out images per concept (0: all)")
    p.add_argument("--stages", type=_stages, default=DEFAULT_STAGES_TEXT,
                   help="DC adaptive elimination schedule 'pairs:keep,...' (default '8:2,32:1'; exhaustive: '32:1')")
    p.add_argument("--seed", type=int, default=0, help="seed of generation noise and DC (t, eps) pairs")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                   help="other run dirs to compare with --run (evaluated first when they lack eval/metrics.json)")
    p.add_argument("--compare_dir", default=None, help="where the comparison goes (default: RUN/eval/compare)")
    p.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads; 1 is often much faster on a busy machine (OpenMP oversubscription)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    return p


def _evaluate_and_report(run_dir: str, args) -> dict:
    from dcfast.eval.evaluation import EvalConfig, evaluate
    from dcfast.eval.report import write_report
    from dcfast.io.runs import Run

    guidance = Run(run_dir).sampling_guidance() if args.guidance_scale is None else args.guidance_scale
    config = EvalConfig(num_images=args.num_images, num_inference_steps=args.num_inference_steps,
                        guidance_scale=guidance, max_eval_images=args.max_eval_images or None,
                        stages=args.stages, seed=args.seed, device=args.device, progress=not args.quiet,
                        fidelity_images=args.fidelity_images, fidelity_only=args.fidelity_only)
    result = evaluate(run_dir, features=args.features, num_images=args.num_images, config=config)
    paths = write_report(result)
    print(f"{run_dir}: report {paths['report']}")
    print("  " + ", ".join(f"{k}={v:.4g}" for k, v in result.summary.items() if isinstance(v, float)))
    print(f"  features: {result.features}")
    return paths


def check_device(text: str) -> None:
    """ValueError naming --device when torch cannot use it (a CUDA device on a CPU-only torch, a typo)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device: {text!r} is not a torch device ({error}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        raise ValueError(f"--device: {text!r} is not available: {why}; use --device cpu, or install a CUDA build of "
                         f"torch on a machine with a GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {text!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")


def run(args) -> int:
    """Evaluate --run, then (with --compare) the runs without metrics, and write the comparison."""
    from dcfast.eval.report import compare
    from dcfast.io.runs import EVAL_DIR

    check_device(args.device)
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    _evaluate_and_report(args.run, args)
    if args.compare:
        for other in args.compare:
            if not os.path.isfile(os.path.join(other, EVAL_DIR, "metrics.json")):
                _evaluate_and_report(other, args)
        out_dir = args.compare_dir or os.path.join(args.run, EVAL_DIR, "compare")
        paths = compare([args.run, *args.compare], out_dir)
        print(f"comparison: {paths['table']}, {paths['plot']}")
    return 0
