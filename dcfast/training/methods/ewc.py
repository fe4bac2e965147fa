"""EWC (vanilla, online): per-sample diagonal Fisher of the denoising loss after each task (docs/design.md).

    F <- gamma F + F_n / s,   F_n = sum over the task's images of g_n^2 (never a batch-mean gradient squared)
    L = L_denoise + (lambda/2) sum F (theta - theta*)^2,   theta* = the LoRA at the end of the last task

s = mean of F_n over every LoRA entry (fisher_normalize "mean", the default) or 1 ("none"): with s,
lambda means the same for EWC and EWC-DC, whose raw Fisher sums differ by orders of magnitude. "merged" also
divides the merged F by its mean, so the penalty's total stays lambda however many tasks it holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dcfast.training.adapters import lora_state
from dcfast.engine.fisher import FisherAccumulator
from dcfast.training.methods.base import LogParts, Method, Models, TaskData
from dcfast.training.objectives import accumulate_fisher, fisher_pairs, per_sample_denoise_losses, shard
from dcfast.training.settings import MethodSettings, setting


@dataclass
class EWCSettings(MethodSettings):
    """EWC's settings (EWC-DC's too). The Fisher is a sum over the task's images of per-sample squared gradients."""

    # lambda: penalty weight, on the mean-normalised Fisher (fisher_normalize), one value for EWC and EWC-DC.
    # Chosen on known-same-class-val (benchmarks/methods_tuning.md): EWC's final fidelity 0.58 / 0.50 / 0.59 / 0.59 at
    # lambda 0.01 / 0.1 / 1 / 10, forgetting 0.06 / 0.01 / 0 / 0: 1 and 10 tie (within one sample of 32), the
    # milder 1 is kept, and EWC-DC's DC term was tuned at 1.
    ewc_lambda: float = setting(1.0, nonnegative=True)
    # Online Fisher decay F <- gamma F + F_n (Schwarz et al.'s online EWC). EWC-DC on known-same-class-val: 0.5 / 0.9 / 1
    # gave final fidelity 0.73 / 0.73 / 0.73, forgetting 0.01 each: no effect over 4 tasks; 0.9 stays.
    gamma: float = 0.9
    fisher_num_timesteps: int = setting(4, at_least=1)  # (t, eps) pairs per image for the Fisher, evenly strided t
    fisher_batch_size: int = setting(4, at_least=1)  # images per Fisher backward pass (a sample's rows never split)
    # Each task's F_n is divided by its mean over all LoRA entries before the merge F <- gamma F + F_n / mean(F_n),
    # so lambda means the same for EWC and EWC-DC: raw sums differ by orders of magnitude between the denoising
    # and the DC loss (measured 120x at tau = 1, 1/100 at tau = 0.01), and change with tau, image count and T.
    # With "mean", every task adds mean 1, gamma keeps its meaning (an old task weighs gamma^age), and the merged
    # F has mean sum_age gamma^age <= 1/(1 - gamma). "none": the raw per-sample sums (docs/design.md as written).
    # "merged": as "mean", then the merged F divided by its mean, so every task meets a penalty of mean lambda
    # (with "mean" it grows with the tasks held: 1.9 at task 3 for gamma 0.9), the tasks sharing it by gamma^age.
    # Novel-same-class-val, seed 0: EWC-DC at lambda 0.1 ("mean") kept concepts 1 and 2 through task 2, then learned
    # nothing in task 3; "merged" learned a little more there but ended lower (final 0.180 against 0.227; at lambda
    # 0.3 0.242 against 0.273, benchmarks/methods_tuning.md), so "mean" stays.
    fisher_normalize: str = setting("mean", choices=("mean", "none", "merged"))

    def problems(self, config) -> List[str]:
        found = super().problems(config)
        if not isinstance(self.gamma, (int, float)) or isinstance(self.gamma, bool) or not 0 <= self.gamma <= 1:
            found.append(f"gamma: the Fisher decay must lie in [0, 1], got {self.gamma!r}")
        return found


def entry_mean(tensors: List[torch.Tensor]) -> float:
    """Mean over every entry of the tensors (in float64: a Fisher's entries span many orders of magnitude)."""
    return float(sum(t.double().sum() for t in tensors) / sum(t.numel() for t in tensors))


@dataclass
class FisherObjective:
    """What F_n is taken from: `losses(ids)`, the (len(ids),) per-sample losses times `scale` (so F_n is their
    squared gradients' sum divided by scale^2), and what the method records about them into the task's metrics.

    The scale keeps a saturated loss's gradients (EWC-DC's -log p(c_n) near 0) inside float32's range while they are
    squared and summed; a normalised Fisher does not depend on it."""

    losses: Callable[[List[int]], torch.Tensor]
    scale: float = 1.0
    record: Dict[str, float] = field(default_factory=dict)


class EWC(Method):
    """Sequential LoRA plus the online-EWC penalty."""

    name = "ewc"
    Settings = EWCSettings

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.fisher = FisherAccumulator(models.unet)
        self.anchor: Dict[str, torch.Tensor] = {}  # theta*, by U-Net parameter name

    def penalty(self) -> torch.Tensor:
        """(lambda/2) sum F (theta - theta*)^2; zero before the first consolidation."""
        if not self.anchor:
            return torch.zeros((), device=self.task.latents.device)
        return self.settings.ewc_lambda * self.fisher.penalty(self.anchor)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        denoise, penalty = self.denoise(x0), self.penalty()
        return denoise + penalty, {"denoise": denoise.item(), "penalty": penalty.item()}

    def fisher_objective(self, task: TaskData) -> FisherObjective:
        """Per-sample losses whose squared gradients make F_n: the denoising loss under c_n."""
        models = self.models
        with torch.no_grad():
            cond = models.encode([task.prompt])[0]

        def losses(ids: List[int]) -> torch.Tensor:
            x0 = task.latents[ids]
            t, noise = fisher_pairs(models.noise_scheduler, x0, ids, self.settings.fisher_num_timesteps, task.seed)
            return per_sample_denoise_losses(models.unet, models.noise_scheduler, x0, cond, t, noise,
                                             task.time_ids_of(ids))

        return FisherObjective(losses)

    def end_task(self, task: TaskData, log: Optional[LogParts] = None) -> Dict[str, float]:
        models, settings = self.models, self.settings
        # F_n alone first (it is normalised before the merge): every process accumulates its share of the
        # images, the all-reduce sums the shares, so every process holds the whole F_n, as it holds the past F.
        past = [f.clone() for f in self.fisher.fisher.values()]
        self.fisher.reset()
        ids = shard(task.latents.shape[0], models.process_index, models.num_processes)
        label = f"task {task.index} Fisher ({self.name})" if models.shows_progress else None
        objective = self.fisher_objective(task)
        accumulate_fisher(self.fisher, objective.losses, ids, settings.fisher_batch_size,
                          list(models.lora().values()), progress=label)
        self.fisher.all_reduce_()
        new = list(self.fisher.fisher.values())
        scaled_mean = entry_mean(new)
        if settings.fisher_normalize in ("mean", "merged") and scaled_mean > 0:
            torch._foreach_mul_(new, 1.0 / scaled_mean)
        elif settings.fisher_normalize == "none" and objective.scale != 1.0:
            torch._foreach_mul_(new, objective.scale ** -2)  # the raw F_n (a saturated one may round to 0 here)
        torch._foreach_add_(new, past, alpha=settings.gamma)  # F <- gamma F + F_n / s
        if settings.fisher_normalize == "merged":
            merged_mean = entry_mean(new)
            if merged_mean > 0:
                torch._foreach_mul_(new, 1.0 / merged_mean)
        self.anchor = lora_state(models.unet)
        return {"fisher_sum": float(sum(f.sum() for f in new)), "fisher_raw_mean": scaled_mean / objective.scale ** 2,
                **objective.record}

    def fisher_state(self) -> Dict[str, torch.Tensor]:
        state = {f"fisher.{k}": v for k, v in self.fisher.state_dict().items()}
        state.update({f"anchor.{k}": v for k, v in self.anchor.items()})
        return state

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.fisher_state()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.fisher.load_state_dict({k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")})
        self.anchor = {k[len("anchor."):]: v.clone() for k, v in state.items() if k.startswith("anchor.")}
