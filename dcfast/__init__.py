"""dcfast: fused kernels for continual personalization of text-to-image diffusion models."""
from dcfast._backend import backend_info
from dcfast import ops
from dcfast.fisher import FisherAccumulator
from dcfast.scores import dc_logits, dc_loss_backward, dc_scores

__version__ = "0.1.0"


# The training and evaluation stacks (diffusers, peft, transformers) load on first use, not at import.
_LAZY = {"train": ("dcfast.trainer", "train"), "evaluate": ("dcfast.evaluation", "evaluate")}


def __getattr__(name: str):
    """`dcfast.train(config)` and `dcfast.evaluate(run_dir)` without importing their stacks up front."""
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dcfast' has no attribute {name!r}")


__all__ = ["FisherAccumulator", "backend_info", "dc_logits", "dc_loss_backward", "dc_scores", "evaluate", "ops",
           "train"]
