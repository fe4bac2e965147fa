"""`dcfast train --config run.yaml [flags]`: every shared TrainConfig field and every method's setting is a flag
of the same name, overriding the file.

The flags are generated from the dataclasses (`dcfast.training.settings`): the type from the field's annotation,
the choices from its `setting(...)`, the help from the reason comment beside the field. Each method's settings
form a group of their own. They are added when the `train` parser is first used (its parse or its --help): the
method registry imports torch, and `dcfast --help` and the other subcommands stay fast without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing

import yaml

from dcfast.training.config import RENAMED, TrainConfig
from dcfast.training.settings import default_of, field_help


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


def _flag_kwargs(f: dataclasses.Field, hint) -> dict:
    """argparse keywords for one field: type, choices, nargs or a --flag/--no-flag pair."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint
    if f.name == "tasks":
        return {"type": _tasks, "metavar": "YAML"}
    if typing.get_origin(base) is typing.Union:  # temperature: a number or "auto"
        return {"type": _temperature, "metavar": "TAU|auto"}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is list:
        return {"nargs": "+", "metavar": "PROMPT" if f.name.endswith("prompts") else "NAME"}
    kwargs = {"type": base if base in (int, float, str) else str}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    return kwargs


def _add_fields(group, cls: type, names=None) -> None:
    """One flag per field of dataclass `cls` (those in `names`, if given), with its reason as help."""
    helps, hints = field_help(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "method_settings" or (names is not None and f.name not in names):
            continue
        text = (helps.get(f.name) or f.name).replace("%", "%%") + f" (default: {default_of(f)!r})"
        group.add_argument(f"--{f.name}", default=None, help=text, **_flag_kwargs(f, hints[f.name]))


def settings_groups():
    """[(the methods that read them, a settings class holding them, their names)]: every method's settings,
    grouped by which methods read them, in registry order."""
    from dcfast.training.methods import REGISTRY, get_method

    readers = {}  # setting name -> the methods that read it
    for name, method in REGISTRY:
        for f in dataclasses.fields(method.Settings):
            readers.setdefault(f.name, []).append(name)
    groups = {}
    for setting_name, methods in readers.items():
        groups.setdefault(tuple(methods), []).append(setting_name)
    return [(methods, get_method(methods[0]).Settings, names) for methods, names in groups.items()]


class _TrainParser(argparse.ArgumentParser):
    """The `train` parser: the methods' settings flags are added on first use (they need the registry, torch)."""

    _complete = False

    def _add_method_flags(self) -> None:
        if self._complete:
            return
        self._complete = True
        for methods, cls, names in settings_groups():
            _add_fields(self.add_argument_group(f"settings of method {', '.join(methods)}"), cls, set(names))

    def parse_known_args(self, args=None, namespace=None):
        self._add_method_flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_method_flags()
        return super().format_help()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` on the `dcfast` command's subparsers."""
    parser = subparsers.add_parser("train", help="continual personalization of a diffusers model, task after task",
                                   description="Train every task of the config in order; every shared TrainConfig "
                                               "field and every method's setting is a flag, and flags override "
                                               "the file.")
    parser.__class__ = _TrainParser  # argparse builds subparsers of its own class; this one completes itself
    parser.add_argument("--config", help="YAML file with TrainConfig fields (tasks, method, the method's settings)")
    _add_fields(parser, TrainConfig)
    for old, new in RENAMED.items():
        parser.add_argument(f"--{old}", type=_renamed(old, new), default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config file (if any) with every given flag applied."""
    config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    flags = {name: value for name, value in vars(args).items()
             if name not in ("config", "handler", "command") and value is not None}
    return config.override(**flags)


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
    from dcfast.training.trainer import train

    log_to_stderr()
    result = train(config_from_args(args))
    for folder, metrics in zip(result.task_dirs, result.metrics):
        print(f"{folder}: final_loss={metrics['final_loss']:.4f}")
    return 0
