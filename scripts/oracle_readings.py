"""What the oracle reads a run's samples as, per attribute (the confusions behind a low fidelity):

    python scripts/oracle_readings.py RUN_DIR STATE [--samples 32] [--guidance 5] [--prompt "a photo of a square" ...]

Samples every concept i <= STATE under task state STATE with evaluation's seeds (`dcfast eval`'s samples, seed 0)
and prints, per concept, the three most frequent readings of each attribute by name, with counts. With --prompt,
the given prompts instead (seed i for the i-th): what the state draws for words the base model knows, which shows
whether a LoRA's change follows its token or the whole model.
"""
from __future__ import annotations

import argparse
import collections

import torch

from dcfast.eval.sampling import generate
from dcfast.io.runs import Run, load_pipeline
from dcfast.world.oracle import ORACLE_FILE, load_oracle, read_attributes
from dcfast.world.scenes import ATTRIBUTES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("state", type=int)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=None, help="default: the run's own sampling guidance")
    parser.add_argument("--prompt", action="append", default=None, help="read this prompt instead (repeatable)")
    args = parser.parse_args(argv)
    run = Run(args.run_dir)
    guidance = run.sampling_guidance() if args.guidance is None else args.guidance
    pipe = load_pipeline(args.run_dir, args.state)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(ORACLE_FILE)
    prompts = args.prompt or [task.prompt for task in run.tasks()[:args.state]]
    for seed, prompt in enumerate(prompts, start=1):
        images = generate(pipe, prompt, args.samples, num_inference_steps=20, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(seed))
        readings = read_attributes(oracle, images)
        top = {name: ", ".join(f"{ATTRIBUTES[name][v]} {n}" for v, n in
                               collections.Counter(readings[name].tolist()).most_common(3)) for name in readings}
        print(f"{prompt}: " + "; ".join(f"{name}: {value}" for name, value in top.items()))


if __name__ == "__main__":
    main()
