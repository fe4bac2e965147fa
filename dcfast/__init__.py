"""dcfast: fused kernels for continual personalization of text-to-image diffusion models."""
from dcfast._backend import backend_info
from dcfast import ops
from dcfast.scores import dc_logits, dc_loss_backward, dc_scores

__version__ = "0.1.0"
__all__ = ["backend_info", "dc_logits", "dc_loss_backward", "dc_scores", "ops"]
