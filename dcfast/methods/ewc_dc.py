"""EWC-DC: EWC whose Fisher and extra loss term come from DC scores (DESIGN 1).

    L = L_denoise + delta * sum_{i in S} (2*1[i=n] - 1) H(p_theta(.|x0), c_i) + (lambda/2) sum F_DC (theta - theta*)^2

S = c_n, c_0 and up to k-2 earlier concepts (k = num_dc_concepts); H(p, c_i) = -log p(c_i);
F_DC = per-sample Fisher of H(p_theta(.|x0), c_n) over the task's images, merged online like EWC.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from dcfast.methods.ewc import EWC
from dcfast.methods.base import TaskData
from dcfast.objectives import dc_log_probs, dc_term, fisher_pairs, random_pairs


class EWCDC(EWC):
    """EWC with the DC pull/push term and the DC-classification Fisher."""

    name = "ewc-dc"

    def concepts(self, task: TaskData, generator: Optional[torch.Generator]) -> List[str]:
        """S: [c_n, c_0] + up to k-2 earlier prompts (random with `generator`, else the most recent)."""
        past, extra = task.past_prompts, max(0, self.config.num_dc_concepts - 2)
        if len(past) <= extra:
            chosen = list(past)
        elif generator is None:
            chosen = past[-extra:] if extra else []
        else:
            chosen = [past[i] for i in sorted(torch.randperm(len(past), generator=generator)[:extra].tolist())]
        return [task.prompt, task.class_prompt] + chosen

    def dc_loss(self, x0: torch.Tensor, conds: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The DC term for conditions `conds` (K, L, D) whose row 0 is c_n."""
        models, config = self.models, self.config
        log_probs = dc_log_probs(models.unet, models.noise_scheduler, x0, conds, timesteps, noise,
                                 config.temperature, config.dc_loss, config.dc_max_batch)
        return dc_term(log_probs, own=0)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        task, config = self.task, self.config
        conds = self.models.encode(self.concepts(task, task.shared_generator))
        timesteps, noise = random_pairs(self.models.noise_scheduler, x0, config.num_dc_timesteps, task.generator)
        denoise, dc, penalty = self.denoise(x0), self.dc_loss(x0, conds, timesteps, noise), self.penalty()
        total = denoise + config.delta * dc + penalty
        return total, {"denoise": denoise.item(), "dc": dc.item(), "penalty": penalty.item()}

    def fisher_losses(self, task: TaskData) -> Callable[[List[int]], torch.Tensor]:
        """Per-sample H(p_theta(.|x0), c_n) over S, each image's K*T rows in one unchunked pass."""
        models, config = self.models, self.config
        with torch.no_grad():
            conds = models.encode(self.concepts(task, None))

        def losses(ids: List[int]) -> torch.Tensor:
            x0 = task.latents[ids]
            t, noise = fisher_pairs(models.noise_scheduler, x0, ids, config.fisher_num_timesteps, task.seed)
            rows = len(ids) * conds.shape[0] * t.shape[1]  # unchunked: one forward holds every sample's rows
            log_probs = dc_log_probs(models.unet, models.noise_scheduler, x0, conds, t, noise,
                                     config.temperature, config.dc_loss, max_batch=rows)
            return -log_probs[:, 0]

        return losses
