"""`dcfast train --config run.yaml [flags]`: every TrainConfig field is a flag of the same name, overriding the file.

The flags are generated from the dataclass: the type from the field's annotation, the choices from
`dcfast.config.CHOICES`, the help from the reason comment beside the field (`dcfast.config.field_help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

import yaml

from dcfast.config import CHOICES, RENAMED, TrainConfig, field_help


def _temperature(text: str):
    """temperature: a number or "auto"."""
    try:
        return float(text)
    except ValueError:
        if text != "auto":
            raise argparse.ArgumentTypeError(f"must be a number > 0 or 'auto', got {text!r}")
        return text


def _tasks(text: str):
    """tasks as YAML/JSON text, e.g. '[{images: photos/dog, class_word: dog}]'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"not valid YAML ({str(error).splitlines()[0]}); "
                                         f"e.g. '[{{images: photos/dog, class_word: dog}}]'")


def _renamed(old: str, new: str):
    def refuse(text: str):
        raise argparse.ArgumentTypeError(f"--{old} was renamed to --{new} (c_0, the pretrained concept); use --{new}")
    return refuse


def _flag_kwargs(name: str, hint, default) -> dict:
    """argparse keywords for one field: type, choices, nargs or a --flag/--no-flag pair."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint
    if name == "tasks":
        return {"type": _tasks, "metavar": "YAML"}
    if name == "temperature":
        return {"type": _temperature, "metavar": "TAU|auto"}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is list:
        return {"nargs": "+", "metavar": "PROMPT" if name.endswith("prompts") else "NAME"}
    kwargs = {"type": base if base in (int, float, str) else str}
    if name in CHOICES:
        kwargs["choices"] = CHOICES[name]
    return kwargs


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` on the `dcfast` command's subparsers."""
    parser = subparsers.add_parser("train", help="continual personalization of a diffusers model, task after task",
                                   description="Train every task of the config in order; every TrainConfig field is "
                                               "a flag, and flags override the file.")
    parser.add_argument("--config", help="YAML file with TrainConfig fields (tasks, method, ...)")
    helps, hints = field_help(), typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = (helps.get(f.name) or f.name).replace("%", "%%") + f" (default: {default!r})"
        parser.add_argument(f"--{f.name}", default=None, help=text, **_flag_kwargs(f.name, hints[f.name], default))
    for old, new in RENAMED.items():
        parser.add_argument(f"--{old}", type=_renamed(old, new), default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file (if any) with every given flag applied."""
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    return config.override(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def log_to_stderr() -> None:
    """INFO records of the `dcfast` loggers (the run summary, per-task evaluation) to stderr, once per process.

    Python drops INFO records when no handler is set; a library must not configure the root logger, the
    command line may configure its own.
    """
    logger = logging.getLogger("dcfast")
    if not any(getattr(h, "_dcfast", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._dcfast = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    """Validate, train, and print where each task's outputs went."""
    from dcfast.trainer import train

    log_to_stderr()
    result = train(config_from_args(args))
    for folder, metrics in zip(result.task_dirs, result.metrics):
        print(f"{folder}: final_loss={metrics['final_loss']:.4f}")
    return 0
