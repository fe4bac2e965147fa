"""EWC (vanilla, online): per-sample diagonal Fisher of the denoising loss after each task (DESIGN 1).

    F <- gamma F + F_n / s,   F_n = sum over the task's images of g_n^2 (never a batch-mean gradient squared)
    L = L_denoise + (lambda/2) sum F (theta - theta*)^2,   theta* = the LoRA at the end of the last task

s = mean of F_n over every LoRA entry (fisher_normalize "mean", the default) or 1 ("none"): with s,
lambda means the same for EWC and EWC-DC, whose raw Fisher sums differ by orders of magnitude.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from dcfast.adapters import lora_state
from dcfast.fisher import FisherAccumulator
from dcfast.methods.base import Method, Models, TaskData
from dcfast.objectives import accumulate_fisher, fisher_pairs, per_sample_denoise_losses, shard


class EWC(Method):
    """Sequential LoRA plus the online-EWC penalty."""

    name = "ewc"
    config_fields = ("ewc_lambda", "gamma", "fisher_batch_size", "fisher_normalize", "fisher_num_timesteps")

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.fisher = FisherAccumulator(models.unet)
        self.anchor: Dict[str, torch.Tensor] = {}  # theta*, by U-Net parameter name

    def penalty(self) -> torch.Tensor:
        """(lambda/2) sum F (theta - theta*)^2; zero before the first consolidation."""
        if not self.anchor:
            return torch.zeros((), device=self.task.latents.device)
        return self.config.ewc_lambda * self.fisher.penalty(self.anchor)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        denoise, penalty = self.denoise(x0), self.penalty()
        return denoise + penalty, {"denoise": denoise.item(), "penalty": penalty.item()}

    def fisher_losses(self, task: TaskData) -> Callable[[List[int]], torch.Tensor]:
        """Per-sample losses whose squared gradients make F_n: the denoising loss under c_n."""
        models = self.models
        with torch.no_grad():
            cond = models.encode([task.prompt])[0]

        def losses(ids: List[int]) -> torch.Tensor:
            x0 = task.latents[ids]
            t, noise = fisher_pairs(models.noise_scheduler, x0, ids, self.config.fisher_num_timesteps, task.seed)
            return per_sample_denoise_losses(models.unet, models.noise_scheduler, x0, cond, t, noise)

        return losses

    def end_task(self, task: TaskData) -> Dict[str, float]:
        models, config = self.models, self.config
        # F_n alone first (it is normalised before the merge): every process accumulates its share of the
        # images, the all-reduce sums the shares, so every process holds the whole F_n, as it holds the past F.
        past = [f.clone() for f in self.fisher.fisher.values()]
        self.fisher.reset()
        ids = shard(task.latents.shape[0], models.rank, models.world)
        label = f"task {task.index} Fisher ({self.name})" if models.accelerator.is_local_main_process else None
        accumulate_fisher(self.fisher, self.fisher_losses(task), ids, config.fisher_batch_size,
                          list(models.lora().values()), progress=label)
        self.fisher.all_reduce_()
        new = list(self.fisher.fisher.values())
        raw_mean = float(sum(f.double().sum() for f in new) / sum(f.numel() for f in new))
        if config.fisher_normalize == "mean" and raw_mean > 0:
            torch._foreach_mul_(new, 1.0 / raw_mean)
        torch._foreach_add_(new, past, alpha=config.gamma)  # F <- gamma F + F_n / s
        self.anchor = lora_state(models.unet)
        return {"fisher_sum": float(sum(f.sum() for f in new)), "fisher_raw_mean": raw_mean}

    def fisher_state(self) -> Dict[str, torch.Tensor]:
        state = {f"fisher.{k}": v for k, v in self.fisher.state_dict().items()}
        state.update({f"anchor.{k}": v for k, v in self.anchor.items()})
        return state

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.fisher_state()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.fisher.load_state_dict({k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")})
        self.anchor = {k[len("anchor."):]: v.clone() for k, v in state.items() if k.startswith("anchor.")}
