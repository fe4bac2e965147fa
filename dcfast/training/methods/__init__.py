"""Continual-personalization methods, one file each, dispatched by name through one table.

A method's file holds its `Method` subclass and its settings dataclass (`Settings`); adding a method is that
file and one line of REGISTRY. A name is normalised (lower case, '_' -> '-') and looked up in REGISTRY in
order; the first match wins (peft-style dispatch).
"""
from typing import Dict, Tuple, Type

from dcfast.training.methods.base import Method, Models, TaskData
from dcfast.training.methods.c_lora import CLoRA
from dcfast.training.methods.custom_diffusion import CustomDiffusion
from dcfast.training.methods.dsc import DSC, DSCEWCDC
from dcfast.training.methods.ewc import EWC
from dcfast.training.methods.ewc_dc import EWCDC
from dcfast.training.methods.joint import JointTraining
from dcfast.training.methods.lora import SequentialLoRA
from dcfast.training.methods.ti import TextualInversion

REGISTRY: Tuple[Tuple[str, Type[Method]], ...] = (
    ("lora", SequentialLoRA),
    ("ewc", EWC),
    ("ewc-dc", EWCDC),
    ("dsc", DSC),
    ("dsc+ewc-dc", DSCEWCDC),
    ("c-lora", CLoRA),
    ("ti", TextualInversion),
    ("custom-diffusion", CustomDiffusion),
    ("joint", JointTraining),
)
METHODS: Dict[str, Type[Method]] = dict(REGISTRY)


def get_method(name: str) -> Type[Method]:
    """The method class registered under `name`."""
    key = name.strip().lower().replace("_", "-")
    for registered, cls in REGISTRY:
        if key == registered:
            return cls
    raise ValueError(f"method: unknown method {name!r}; choose one of {', '.join(METHODS)}")


__all__ = ["METHODS", "REGISTRY", "Method", "Models", "TaskData", "get_method"]
