"""`dcfast train --config run.yaml [flags]`: flags override the file, named as in diffusers' scripts."""
from __future__ import annotations

import argparse

from dcfast.config import MIXED_PRECISION, TrainConfig

# (flag, type, help); each overrides the config field of the same name when given.
OVERRIDES = (
    ("pretrained_model_name_or_path", str, "local diffusers model directory (unet/, text_encoder/, tokenizer/, scheduler/, [vae/])"),
    ("output_dir", str, "where task_{i}/ outputs and checkpoints are written"),
    ("method", str, "lora | ewc | ewc-dc | dsc | dsc+ewc-dc | c-lora"),
    ("rank", int, "LoRA rank"),
    ("learning_rate", float, "LoRA learning rate"),
    ("max_train_steps", int, "optimizer steps per task"),
    ("train_batch_size", int, "images per process per micro-step"),
    ("gradient_accumulation_steps", int, "micro-steps per optimizer step"),
    ("seed", int, "seed of every random stream of the run"),
    ("checkpointing_steps", int, "write a mid-task checkpoint every N steps"),
    ("resume_from_checkpoint", str, "'latest' (continue the run in output_dir) or a checkpoint directory"),
    ("report_to", str, "'tensorboard' to log scalars under output_dir/logs"),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` on the `dcfast` command's subparsers."""
    parser = subparsers.add_parser("train", help="continual personalization of a diffusers model, task after task",
                                   description="Train every task of the config in order; flags override the file.")
    parser.add_argument("--config", help="YAML file with TrainConfig fields (tasks, method, ...)")
    for name, kind, text in OVERRIDES:
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    parser.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=None, help="autocast precision")
    parser.add_argument("--eval_every_task", action="store_true", default=None,
                        help="evaluate each task state right after training it (task_{i}/eval.json)")
    parser.set_defaults(handler=run)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file (if any) with every given flag applied."""
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    names = [name for name, _, _ in OVERRIDES] + ["mixed_precision", "eval_every_task"]
    return config.override(**{name: getattr(args, name) for name in names})


def run(args: argparse.Namespace) -> int:
    """Validate, train, and print where each task's outputs went."""
    from dcfast.trainer import train

    result = train(config_from_args(args))
    for folder, metrics in zip(result.task_dirs, result.metrics):
        print(f"{folder}: final_loss={metrics['final_loss']:.4f}")
    return 0
