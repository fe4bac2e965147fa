"""dcfast: fused kernels for continual personalization of text-to-image diffusion models."""

__version__ = "0.1.0"


# Everything loads on first use, not at import: the kernels' Python faces pull in torch's compiler
# (about 2 s), and `dcfast --help` needs none of it. Any attribute of the kernel family imports
# `dcfast.ops` first, so the torch.ops.dcfast kernels (C++, CUDA, Triton) are registered by then.
_LAZY = {
    "train": ("dcfast.training.trainer", "train"),
    "evaluate": ("dcfast.eval.evaluation", "evaluate"),
    "backend_info": ("dcfast._backend", "backend_info"),
    "ops": ("dcfast.ops", None),
    "FisherAccumulator": ("dcfast.engine.fisher", "FisherAccumulator"),
    "dc_logits": ("dcfast.engine.scores", "dc_logits"),
    "dc_loss_backward": ("dcfast.engine.scores", "dc_loss_backward"),
    "dc_scores": ("dcfast.engine.scores", "dc_scores"),
}


def __getattr__(name: str):
    """`dcfast.dc_scores(...)`, `dcfast.train(config)`, ... without importing their stacks up front."""
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        if module not in ("dcfast.training.trainer", "dcfast.eval.evaluation"):
            importlib.import_module("dcfast.ops")
        loaded = importlib.import_module(module)
        value = loaded if attribute is None else getattr(loaded, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dcfast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["FisherAccumulator", "backend_info", "dc_logits", "dc_loss_backward", "dc_scores", "evaluate", "ops",
           "train"]
