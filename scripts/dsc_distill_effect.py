"""How much DSC's distillation restores: fidelity of each earlier concept under a task's LoRA before
distillation (T1, kept in the teacher pool) and after it (the saved task state), same samples and oracle.

A diagnostic of a finished DSC run (no choice is made from it): for states j = 2..N, every concept i < j
is sampled with the evaluation's settings and seed (dcfast.eval.evaluation), once under the pre-distillation
LoRA_j and once under the saved (post-distillation) state, and the oracle reads shape and colour.

    python scripts/dsc_distill_effect.py RUN_DIR [--json OUT]
"""
from __future__ import annotations

import argparse
import collections
import json

import torch
from safetensors.torch import load_file

from dcfast.training.adapters import lora_parameters
from dcfast.eval.evaluation import EvalConfig, world_concepts
from dcfast.world.oracle import fidelity, load_oracle, read_attributes
from dcfast.io.runs import Run, load_pipeline, task_dir
from dcfast.eval.sampling import generate
from dcfast.world.scenes import COLOUR_NAMES


def pool_lora(run_dir: str, task_index: int, unet) -> dict:
    """LoRA_j before distillation (method.pool.{j-1} of task j's trainer state), named as in `unet`."""
    state = load_file(str(task_dir(run_dir, task_index) / "trainer_state.safetensors"))
    prefix = f"method.pool.{task_index - 1}."
    live = lora_parameters(unet)
    adapter = next(iter(live)).split(".lora_A.")[-1].split(".")[0] if ".lora_A." in next(iter(live)) else "default"
    found = {}
    for name, value in state.items():
        if name.startswith(prefix):
            found[name[len(prefix):].replace(".default.", f".{adapter}.")] = value
    if set(found) != set(live):
        raise ValueError(f"pool LoRA of task {task_index} does not match the pipeline's LoRA names")
    return found


def measure(pipe, oracle, prompt: str, concept, config: EvalConfig, seed: int) -> dict:
    images = generate(pipe, prompt, config.fidelity_images, num_inference_steps=config.num_inference_steps,
                      guidance_scale=config.guidance_scale, generator=torch.Generator().manual_seed(seed))
    readings = read_attributes(oracle, images)
    drawn = collections.Counter(COLOUR_NAMES[i] for i in readings["colour"].tolist())
    return {**fidelity(readings, concept), "colours_drawn": dict(drawn.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = EvalConfig()
    tasks = Run(args.run_dir).tasks()
    concepts = world_concepts(tasks)
    oracle = load_oracle()
    rows = []
    for j in range(2, len(tasks) + 1):
        pipe = load_pipeline(args.run_dir, j)
        pipe.set_progress_bar_config(disable=True)
        params = lora_parameters(pipe.unet)
        after = {n: p.detach().clone() for n, p in params.items()}
        before = pool_lora(args.run_dir, j, pipe.unet)
        for label, state in (("before", before), ("after", after)):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state[n])
                for task in tasks[:j - 1]:
                    got = measure(pipe, oracle, task.prompt, concepts[task.index - 1], config, config.seed + task.index)
                    row = {"state": j, "distillation": label, "concept": task.index, **got}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
