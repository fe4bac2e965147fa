"""DSC, Diffusion Scores Consolidation (function space), and DSC+EWC-DC (DESIGN 1).

After task n (n >= 2), a student initialised from T1 = LoRA_n is distilled on the task's images from
T1 and from T2 drawn at random from the earlier LoRAs {LoRA_1 .. LoRA_{n-1}}, for M iterations:

    L_DSC = alpha [KL(p_T1 || p_S) + KL(p_T2 || p_S)]                     DC scores over S
          + beta  [||eps_S(x_t, c_n) - eps_T1(x_t, c_n)||^2 + ||eps_S(x_t, c_m) - eps_T2(x_t, c_m)||^2]

with one x_t (same t, same eps) for all four evaluations. Teachers are frozen tensor snapshots,
swapped into the U-Net under no_grad. After task 1 there is no earlier LoRA, so nothing is distilled.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from dcfast.adapters import lora_state, swapped_lora
from dcfast.methods.base import Method, Models, TaskData
from dcfast.methods.ewc_dc import EWCDC
from dcfast.objectives import dc_log_probs, predict_rows, random_pairs


class Distiller:
    """The pool of earlier LoRAs and the DSC distillation loop."""

    def __init__(self, config, models: Models):
        self.config, self.models = config, models
        self.pool: List[Dict[str, torch.Tensor]] = []  # frozen LoRA_1 .. LoRA_{n-1}
        self.draws: List[int] = []  # task index (1-based) of every T2 drawn, for inspection
        self.teacher1: Dict[str, torch.Tensor] = {}

    def concepts(self, task: TaskData, m: int) -> List[str]:
        """S for DSC: c_n, c_0, T2's concept c_m, then other earlier concepts up to k."""
        others = [p for i, p in enumerate(task.past_prompts) if i != m]
        room = max(0, self.config.num_dc_concepts - 3)
        return [task.prompt, task.class_prompt, task.past_prompts[m]] + others[len(others) - room:][:room]

    def step_loss(self, task: TaskData, x0: torch.Tensor, m: int) -> Tuple[torch.Tensor, Dict[str, float]]:
        """L_DSC on one batch with T2 = pool[m]."""
        models, config = self.models, self.config
        unet, scheduler = models.unet, models.noise_scheduler
        with torch.no_grad():
            conds = models.encode(self.concepts(task, m))
        timesteps, noise = random_pairs(scheduler, x0, config.num_dc_timesteps, task.generator)  # shared x_t

        def evaluate(cond_index: int):
            log_probs = dc_log_probs(unet, scheduler, x0, conds, timesteps, noise, config.temperature,
                                     config.dc_loss, config.dc_max_batch)
            return log_probs, predict_rows(unet, scheduler, x0, conds[cond_index], timesteps, noise)

        with torch.no_grad():
            with swapped_lora(unet, self.teacher1):
                p_t1, eps_t1 = evaluate(0)  # T1 under c_n
            with swapped_lora(unet, self.pool[m]):
                p_t2, eps_t2 = evaluate(2)  # T2 under its own concept c_m
        p_s, eps_s_n = evaluate(0)
        eps_s_m = predict_rows(unet, scheduler, x0, conds[2], timesteps, noise)
        kl = (F.kl_div(p_s, p_t1, log_target=True, reduction="batchmean")
              + F.kl_div(p_s, p_t2, log_target=True, reduction="batchmean"))
        mse = F.mse_loss(eps_s_n.float(), eps_t1.float()) + F.mse_loss(eps_s_m.float(), eps_t2.float())
        return config.dsc_alpha * kl + config.dsc_beta * mse, {"dsc_kl": kl.item(), "dsc_mse": mse.item()}

    def distill(self, task: TaskData) -> Dict[str, float]:
        """M iterations of L_DSC on the student (the live LoRA), starting from T1 = LoRA_n."""
        models, config = self.models, self.config
        if not self.pool or config.dsc_iterations == 0:
            return {}
        self.teacher1 = lora_state(models.unet)
        params = list(models.lora().values())
        accelerator = models.accelerator
        optimizer = accelerator.prepare(torch.optim.AdamW(
            params, lr=config.dsc_learning_rate or config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon))
        batch = min(config.train_batch_size, task.latents.shape[0])
        logs: Dict[str, float] = {}
        for _ in range(config.dsc_iterations):
            m = int(torch.randint(len(self.pool), (1,), generator=task.shared_generator))  # same T2 on every process
            self.draws.append(m + 1)
            x0 = task.latents[torch.randint(task.latents.shape[0], (batch,), generator=task.generator)]
            with accelerator.autocast():
                loss, logs = self.step_loss(task, x0, m)
            if not torch.isfinite(accelerator.reduce(loss.detach().float(), reduction="mean")):
                raise FloatingPointError(f"DSC loss became {loss.item()} in task {task.index}; lower dsc_learning_rate")
            accelerator.backward(loss)
            models.average_gradients(params)
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"dsc_loss": config.dsc_alpha * logs["dsc_kl"] + config.dsc_beta * logs["dsc_mse"], **logs}

    def remember(self) -> None:
        """Add the consolidated LoRA of the task just finished to the pool."""
        self.pool.append(lora_state(self.models.unet))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"pool.{i}.{k}": v for i, lora in enumerate(self.pool) for k, v in lora.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        count = len({k.split(".")[1] for k in state if k.startswith("pool.")})
        self.pool = [{k[len(f"pool.{i}."):]: v.clone() for k, v in state.items() if k.startswith(f"pool.{i}.")}
                     for i in range(count)]


class DSC(Method):
    """Sequential LoRA training, DSC consolidation after every task."""

    name = "dsc"

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.distiller = Distiller(config, models)

    def end_task(self, task: TaskData) -> Dict[str, float]:
        metrics = self.distiller.distill(task)
        self.distiller.remember()
        return metrics

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.distiller.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.distiller.load_state_dict(state)


class DSCEWCDC(EWCDC):
    """EWC-DC training; after each task DSC distils, then the EWC-DC Fisher is taken at the student."""

    name = "dsc+ewc-dc"

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.distiller = Distiller(config, models)

    def end_task(self, task: TaskData) -> Dict[str, float]:
        metrics = self.distiller.distill(task)
        metrics.update(super().end_task(task))
        self.distiller.remember()
        return metrics

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {**super().state_dict(), **self.distiller.state_dict()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("pool.")})
        self.distiller.load_state_dict({k: v for k, v in state.items() if k.startswith("pool.")})
