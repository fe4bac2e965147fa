"""`dcfast export --run DIR --output OUT [--task N]`: task state N as one folder a diffusers user loads without dcfast.

`dcfast/cli/main.py` calls `add_parser(subparsers)`; `run(args)` does the work (dcfast.io.export, imported on use).
"""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `export` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="write one task state as a folder diffusers loads (LoRA, one embedding per token, model card)",
        description="Write task state N of a run into OUT: pytorch_lora_weights.safetensors (pipe.load_lora_weights), "
                    "or for a VeRA run adapter_model.safetensors + adapter_config.json (peft's PeftModel on pipe.unet), "
                    "learned_embeds_v{i}.safetensors for i = 1..N (pipe.load_textual_inversion, one token each), "
                    "export.json and README.md, a model card with the prompts, the method, the base model, the "
                    "metrics if the run was evaluated, and the exact diffusers (and peft) loading code.")
    p.add_argument("--run", required=True, help="the run's output_dir (holds run.json and task_1/ ... task_N/)")
    p.add_argument("--output", required=True, help="the folder to write (new, empty, or an earlier dcfast export)")
    p.add_argument("--task", type=int, default=None, help="the task state N to export (default: the last finished)")
    p.set_defaults(handler=run)
    return p


def run(args) -> int:
    from dcfast.io.export import export

    import json

    folder = export(args.run, args.output, task=args.task)
    state = json.loads((folder / "export.json").read_text())["task_state"]
    print(f"{folder}: task state {state} exported (diffusers loading code in {folder / 'README.md'})")
    return 0
