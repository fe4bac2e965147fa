"""The `dcfast` command line: `dcfast demo`, `dcfast train`, `dcfast eval`, `dcfast export`, `dcfast bench ...`."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from dcfast.cli import demo as cli_demo
from dcfast.cli import eval as cli_eval
from dcfast.cli import export as cli_export
from dcfast.cli import train as cli_train
from dcfast.models.architectures import ARCHITECTURES
from dcfast.training.config import ADAPTERS

# target -> (module with run(quick=, device=, ...), the summary keys of its closing line)
BENCHMARKS = {
    "dc-scores": ("dcfast.bench.dc_scores", "speedup_vs_naive speedup_vs_peer max_abs_err"),
    "fisher": ("dcfast.bench.fisher", "speedup_vs_naive max_rel_err peak_mem_ratio_vs_vmap"),
    "train": ("dcfast.bench.train", "max_step_ratio_vs_lora"),
    "methods": ("dcfast.experiments.bench_methods", ""),  # closes with `forgetting lora=<f> ewc=<f> ...` itself
    "world": ("dcfast.experiments.bench_world", "state1_fidelity lora_forgetting ti_fidelity joint_final_fidelity"),
}
# targets that repeat runs over seeds and write their runs under --output_dir
SEEDED = {"methods": "dcfast-bench-methods", "world": "dcfast-bench-world"}


def _add_bench(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark a fused engine against its naive loop, or the methods")
    bench.add_argument("target", choices=sorted(BENCHMARKS), help="what to benchmark")
    bench.add_argument("--quick", action="store_true", help="one small case (seconds to a minute on a CPU)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    bench.add_argument("--json", metavar="FILE", help="also write rows, summary and environment to FILE as JSON")
    bench.add_argument("--seeds", type=int, default=3, help="methods and world: seeds per method (default: 3)")
    bench.add_argument("--workers", type=int, default=None,
                       help="methods and world: runs at once, each in its own process with one torch thread "
                            "(default: methods 2 on a machine with 2+ cores, else 1; world 3, a seed's three runs)")
    bench.add_argument("--method", action="append", default=None, metavar="NAME",
                       help="methods: a method to run, repeatable (default: every method and control); train --arch other than "
                            "tiny: lora, ewc-dc or dsc (default: all three)")
    bench.add_argument("--adapter", default=None, choices=ADAPTERS,
                       help="methods: the U-Net adapter every method's runs train, lora or vera (VeRA: frozen shared "
                            "random matrices, trained vectors; default: the regime's, lora)")
    bench.add_argument("--arch", default="tiny", choices=["tiny", *ARCHITECTURES],
                       help="train: the model whose step costs are measured: tiny (every method on the tiny model "
                            "built in code, the default) or a real architecture built in code with random weights "
                            "(lora, ewc-dc and dsc: seconds and peak memory of one step, each in its own process; "
                            "minutes with --quick, about an hour for sd15 at full size on 2 cores)")
    bench.add_argument("--latent_size", type=int, default=None, metavar="N",
                       help="train --arch other than tiny: latent side (default: the architecture's, 32 with --quick)")
    bench.add_argument("--mixed_precision", default=None, choices=["no", "bf16"],
                       help="train --arch other than tiny: the frozen weights' precision, under autocast (default: "
                            "the architecture's: no (fp32) for sd15; bf16 for sdxl, whose fp32 weights alone are "
                            "13.6 GB)")
    bench.add_argument("--sequence", action="append", default=None, metavar="NAME",
                       help="methods and world: a world test sequence to run, repeatable (methods' default: "
                            "novel-same-class-test, novel-distinct-class-test, novel-same-class-long-test and "
                            "known-same-class-test, --quick: novel-same-class-test's first two concepts; world's: "
                            "novel-same-class-test and known-same-class-test, --quick: the novel one's first two concepts)")
    bench.add_argument("--output_dir", default=None,
                       help="methods and world: where runs and tables go (default: dcfast-bench-<target>, "
                            "dcfast-bench-methods-vera with --adapter vera)")
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    module_name, headline = BENCHMARKS[args.target]
    default_dir = SEEDED.get(args.target, "") + ("-vera" if args.adapter == "vera" else "")
    extra = {"seeds": args.seeds, "output_dir": args.output_dir or default_dir} if args.target in SEEDED else {}
    if args.target in SEEDED:
        default_workers = 3 if args.target == "world" else min(2, os.cpu_count() or 1)
        extra.update(workers=args.workers or default_workers, sequences=args.sequence)
    if args.target in ("methods", "train"):
        extra.update(methods=args.method)
    if args.target == "methods":
        extra.update(adapter=args.adapter)
    elif args.adapter is not None:
        raise ValueError(f"--adapter: only `dcfast bench methods` reads it, not {args.target!r}")
    if args.target == "train":
        extra.update(arch=args.arch, latent_size=args.latent_size, mixed_precision=args.mixed_precision)
    elif args.arch != "tiny" or args.latent_size is not None or args.mixed_precision is not None:
        raise ValueError(f"--arch, --latent_size, --mixed_precision: only `dcfast bench train` reads them, "
                         f"not {args.target!r}")
    result = importlib.import_module(module_name).run(quick=args.quick, device=args.device, **extra)
    if args.json:
        from dcfast.io.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    if headline:
        print(" ".join(f"{key}={result['summary'][key]:.4g}" for key in headline.split()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcfast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_bench(subparsers)
    cli_train.add_parser(subparsers)
    cli_eval.add_parser(subparsers)
    cli_demo.add_parser(subparsers)
    cli_export.add_parser(subparsers)
    return parser


# Third-party notices that say nothing to a dcfast user: (logger, text of the message) pairs, dropped at the entry
# point only (a library must not silence its caller's logs). transformers warns once per image-processor class
# when torchvision is absent, though dcfast's pipelines never run an image processor.
KNOWN_NOISE = (("transformers.utils.import_utils", "requires torchvision (not installed)"),)


class _DropKnownNoise(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Drop KNOWN_NOISE on the loggers that emit it (once per process)."""
    for name, text in KNOWN_NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) and f.text == text for f in log.filters):
            log.addFilter(_DropKnownNoise(text))


def main(argv: Optional[List[str]] = None) -> int:
    quiet_known_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"dcfast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
