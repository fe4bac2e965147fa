"""dcfast: fused kernels for continual personalization of text-to-image diffusion models."""
from dcfast._backend import backend_info
from dcfast import ops
from dcfast.fisher import FisherAccumulator
from dcfast.scores import dc_logits, dc_loss_backward, dc_scores

__version__ = "0.1.0"


def __getattr__(name: str):
    """`dcfast.train(config)` without importing the training stack (diffusers, peft) at `import dcfast`."""
    if name == "train":
        from dcfast.train import train

        globals()["train"] = train
        return train
    raise AttributeError(f"module 'dcfast' has no attribute {name!r}")


__all__ = ["FisherAccumulator", "backend_info", "dc_logits", "dc_loss_backward", "dc_scores", "ops", "train"]
