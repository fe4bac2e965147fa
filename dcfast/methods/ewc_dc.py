"""EWC-DC: EWC whose Fisher and extra loss term come from DC scores (DESIGN 1).

    L = L_denoise + delta * [pull + push] + (lambda/2) sum F_DC (theta - theta*)^2

over S = c_n, c_0 and up to k-2 earlier concepts (k = num_dc_concepts). pull = H(p_theta(.|x0), c_n)
(against a smoothed target with dc_label_smoothing); push over i in S, i != n, per dc_push: the spec's
-H(p, c_i), the bounded -log(1 - p(c_i)), or nothing (see `dcfast.objectives.dc_term`).
F_DC = per-sample Fisher of H(p_theta(.|x0), c_n) over the task's images, merged online like EWC.
tau is the task's (numeric, or "auto": measured at the task's start, `dcfast.objectives.task_temperature`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from dcfast.methods.ewc import EWC
from dcfast.methods.base import TaskData
from dcfast.objectives import (DC_SCORE_FIELDS, dc_log_probs, dc_log_probs_and_rows, dc_term, fisher_pairs, random_pairs,
                               rows_denoise_loss, task_temperature)


def ewc_dc_concepts(task: TaskData, k: int, generator: Optional[torch.Generator]) -> List[str]:
    """S: [c_n, c_0] + min(k-2, n-1) earlier prompts, in task order (random with `generator`, else the most recent)."""
    past, extra = task.past_prompts, max(0, k - 2)
    if len(past) <= extra:
        chosen = list(past)
    elif generator is None:
        chosen = past[len(past) - extra:]
    else:
        chosen = [past[i] for i in sorted(torch.randperm(len(past), generator=generator)[:extra].tolist())]
    return [task.prompt, task.class_prompt] + chosen


def measure_temperature(config, models, task: TaskData) -> float:
    """The task's tau, measured (for "auto") over S = `ewc_dc_concepts(task, k, None)` before any step."""
    with torch.no_grad():
        conds = models.encode(ewc_dc_concepts(task, config.num_dc_concepts, None))
    return task_temperature(config, models.unet, models.noise_scheduler, task.latents, conds, task.seed)


class EWCDC(EWC):
    """EWC with the DC pull/push term and the DC-classification Fisher."""

    name = "ewc-dc"
    config_fields = EWC.config_fields + DC_SCORE_FIELDS + ("delta", "dc_push", "dc_label_smoothing", "dc_c0_weight")

    def begin_task(self, task: TaskData) -> None:
        super().begin_task(task)
        self.temperature = measure_temperature(self.config, self.models, task)

    def concepts(self, task: TaskData, generator: Optional[torch.Generator]) -> List[str]:
        return ewc_dc_concepts(task, self.config.num_dc_concepts, generator)

    def dc_loss(self, x0: torch.Tensor, conds: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The DC term for conditions `conds` (K, L, D) ordered [c_n, c_0, earlier ...]."""
        models, config = self.models, self.config
        log_probs = dc_log_probs(models.unet, models.noise_scheduler, x0, conds, timesteps, noise,
                                 self.temperature, config.dc_loss, config.dc_max_batch)
        return dc_term(log_probs, config.dc_push, config.dc_label_smoothing, config.dc_c0_weight)

    def denoise_and_dc(self, x0: torch.Tensor, conds: torch.Tensor, timesteps: torch.Tensor,
                       noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """dc_denoise_rows: (L_denoise over the DC pass's own c_n rows, the DC term), one U-Net pass for both."""
        models, config = self.models, self.config
        log_probs, (rows,) = dc_log_probs_and_rows(models.unet, models.noise_scheduler, x0, conds, timesteps, noise,
                                                   self.temperature, (0,), config.dc_loss, config.dc_max_batch)
        denoise = rows_denoise_loss(models.noise_scheduler, x0, timesteps, noise, rows)
        return denoise, dc_term(log_probs, config.dc_push, config.dc_label_smoothing, config.dc_c0_weight)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        task, config = self.task, self.config
        conds = self.models.encode(self.concepts(task, task.shared_generator))
        timesteps, noise = random_pairs(self.models.noise_scheduler, x0, config.num_dc_timesteps, task.generator)
        if config.dc_denoise_rows:
            denoise, dc = self.denoise_and_dc(x0, conds, timesteps, noise)
        else:
            denoise, dc = self.denoise(x0), self.dc_loss(x0, conds, timesteps, noise)
        penalty = self.penalty()
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
                                     self.temperature, config.dc_loss, max_batch=rows)
            return -log_probs[:, 0]

        return losses

    def end_task(self, task: TaskData) -> Dict[str, float]:
        return {**super().end_task(task), "temperature": self.temperature}
