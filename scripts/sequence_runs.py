"""One method on world test sequences, judged by fidelity alone (the forgetting-with-length runs of docs/world.md):

    python scripts/sequence_runs.py --sequences novel-same-class-long-test novel-distinct-class-test [--method lora]
        [--seeds 0] [--workdir runs/forgetting]

Each run is `dcfast.experiments.runner.run_method` at the world regime (finished runs are reused); prints each run's
fidelity matrix, plasticity (mean F[i, i]), fidelity forgetting and final fidelity.
"""
from __future__ import annotations

import argparse

import torch

from dcfast.experiments.runner import DemoConfig, run_method, write_concepts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", nargs="+", required=True, help="world sequences")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workdir", default="runs/forgetting", help="where the runs go")
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (1: several runs side by side)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    for sequence in args.sequences:
        for seed in args.seeds:
            folder = f"{args.workdir}/{sequence}/seed_{seed}"
            config = DemoConfig(methods=[args.method], sequence=sequence, seed=seed, progress=False,
                                fidelity_only=True, output_dir=folder)
            result = run_method(config, args.method, write_concepts(config), f"{folder}/{args.method}", reuse=True)
            summary = result["summary"]
            print(f"{sequence} seed {seed} {args.method}: plasticity {summary['plasticity']:.3f}, fidelity forgetting "
                  f"{summary['fidelity_forgetting']:.3f}, final fidelity {summary['final_fidelity']:.3f} "
                  f"({result['report']['report']})", flush=True)


if __name__ == "__main__":
    main()
