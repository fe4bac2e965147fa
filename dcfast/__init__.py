"""dcfast: fused kernels for continual personalization of text-to-image diffusion models."""
from dcfast._backend import backend_info
from dcfast import ops

__version__ = "0.1.0"
__all__ = ["backend_info", "ops"]
