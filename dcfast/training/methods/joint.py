"""Joint training (the upper bound of continual learning, an offline reference, not a continual method): one LoRA
learns every concept of the sequence at once, each with its own token, for the same total steps as the sequence
(max_train_steps per task). Its task folders all hold that one final state (docs/design.md).

Its tokens start at their class word's embedding, as every sequential method's (`joint_token_init`): on a
same-class sequence all of them start equal, and one LoRA must tell the concepts apart by tokens that only
drift apart as they train; "random" starts them apart (C-LoRA's random start).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from dcfast.training.methods.base import Method
from dcfast.training.objectives import denoise_loss
from dcfast.training.settings import MethodSettings, setting


@dataclass
class JointSettings(MethodSettings):
    """Joint training's settings."""

    # Where each task's token starts: "class_word" (as the sequential methods') or "random" (apart from the start).
    joint_token_init: str = setting("class_word", choices=("class_word", "random"))


class JointTraining(Method):
    """L = L_denoise of each image under its own concept's prompt, over a batch drawn from every task."""

    name = "joint"
    joint = True
    token_init_setting = "joint_token_init"
    Settings = JointSettings

    def loss(self, x0: torch.Tensor, prompts: Optional[List[str]] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        prompts = prompts if prompts is not None else [self.task.prompt] * x0.shape[0]
        conds = self.models.encode_each(prompts)
        loss = denoise_loss(self.models.unet, self.models.noise_scheduler, x0, conds, self.task.generator,
                            self.config.noise_offset, self.task.batch_time_ids)
        return loss, {"denoise": loss.item()}
