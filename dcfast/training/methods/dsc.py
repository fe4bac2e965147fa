"""DSC, Diffusion Scores Consolidation (function space), and DSC+EWC-DC (docs/design.md).

After task n (n >= 2), a student initialised from T1 = LoRA_n is distilled on the task's images from
T1 and from T2 drawn at random from the earlier LoRAs {LoRA_1 .. LoRA_{n-1}}, for M iterations:

    L_DSC = alpha [KL(p_T1 || p_S) + KL(p_T2 || p_S)]                     DC scores over S
          + beta  [||eps_S(x_t, c_n) - eps_T1(x_t, c_n)||^2 + ||eps_S(x_t, c_m) - eps_T2(x_t, c_m)||^2]

with one x_t (same t, same eps) for all four evaluations. Teachers are frozen tensor snapshots,
swapped into the U-Net under no_grad. After task 1 there is no earlier LoRA, so nothing is distilled.

S (k = num_dc_concepts, |S| = min(k, n + 1)): [c_n, c_0, c_m] + the k-3 most recent other earlier
prompts; k = 2 is [c_n, c_m] (the two teachers' own concepts carry what the KL terms transfer; c_0 is
the one left out). The pool holds each task's LoRA before distillation (dsc_teacher_pool
"before_distill", the spec's LoRA_n) or after it ("after_distill"). In DSC+EWC-DC the EWC-DC penalty,
with the F and theta* of the tasks before n, is added to L_DSC during distillation (dsc_ewc_penalty).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcfast.training.adapters import lora_state, swapped_lora
from dcfast.training.methods.base import LogParts, Method, Models, TaskData
from dcfast.training.methods.ewc_dc import EWCDC, DCScoreSettings, EWCDCSettings, measure_temperature
from dcfast.training.objectives import dc_log_probs, dc_log_probs_and_rows, predict_rows, random_pairs
from dcfast.training.settings import MethodSettings, setting


@dataclass
class DistillSettings(MethodSettings):
    """DSC's distillation (function-space consolidation after each task from the second on)."""

    # alpha: weight of the two DC-score KL terms. Their logits are errors / tau (auto tau ~5e-4..1e-3), so, like
    # EWC-DC's delta, alpha ~ tau puts them on the noise terms' scale. Chosen on known-same-class-val
    # (benchmarks/methods_tuning.md): final fidelity 0.56 at 1e-3, 0.24 at 1.
    dsc_alpha: float = setting(1e-3, nonnegative=True)
    # beta: weight of the two noise-prediction terms. Same-class-val: 0.1 / 1 / 10 gave final fidelity 0.30 /
    # 0.56 / 0.56 (forgetting 0.23 / -0.07 / -0.04): the noise terms carry DSC's retention; 1 stays.
    dsc_beta: float = setting(1.0, nonnegative=True)
    dsc_iterations: int = setting(50, at_least=0)  # M: distillation steps per task (a quarter of the default task steps)
    dsc_learning_rate: Optional[float] = setting(None, positive=True)  # None: = learning_rate
    # Which LoRA_n joins the pool of T2 teachers: "before_distill" = the task's trained LoRA, the spec's LoRA_n
    # (the teacher that knows c_n best); "after_distill" = the consolidated student. Same-class-val: before 0.56,
    # after 0.50 final fidelity (forgetting -0.07 / 0.04): the spec's stays.
    dsc_teacher_pool: str = setting("before_distill", choices=("before_distill", "after_distill"))
    # T2 of each distillation step: "one" earlier LoRA drawn at random (the spec); "all": every earlier LoRA, L_DSC
    # averaged over them (the expectation that "one" samples), so no earlier concept waits for its draw, at n - 1
    # teacher passes per step. A remedy for DSC's forgetting to try on validation (the methods issue).
    dsc_teachers: str = setting("one", choices=("one", "all"))
    # When the earlier teachers are distilled: "after" the task, M iterations from T1 = LoRA_n (the spec's), or
    # "interleaved" with the task's own training, their T2 terms added to every step of task n >= 2 (the student is
    # the LoRA being trained, so T1's terms vanish and the denoising loss takes their place; nothing runs after the
    # task). A remedy for DSC's forgetting (each task repaints the earlier concepts before any distillation).
    dsc_schedule: str = setting("after", choices=("after", "interleaved"))


@dataclass
class DSCSettings(DCScoreSettings, DistillSettings):
    """DSC's settings: the DC scores' and the distillation's."""


@dataclass
class DSCEWCDCSettings(EWCDCSettings, DistillSettings):
    """DSC+EWC-DC's settings: EWC-DC's, the distillation's, and whether the penalty acts while distilling."""

    # DSC+EWC-DC: the EWC-DC penalty (lambda/2) sum F (theta - theta*)^2 (F and theta* of the tasks before n)
    # also applies during the distillation steps. True: "keeps the EWC-DC penalty" (docs/design.md) read as
    # "whenever the LoRA is optimised"; distillation from one earlier teacher per step would otherwise be free to
    # move weights important to the earlier concepts that teacher does not cover. Same-class-val: with it 0.73
    # final fidelity and no forgetting, without it 0.74 and 0.02 (within one sample; the lower forgetting is kept).
    dsc_ewc_penalty: bool = True


class Distiller:
    """The pool of earlier LoRAs and the DSC distillation loop."""

    def __init__(self, config, settings, models: Models):
        self.config, self.settings, self.models = config, settings, models
        self.pool: List[Dict[str, torch.Tensor]] = []  # frozen LoRA_1 .. LoRA_{n-1}
        self.draws: List[int] = []  # task index (1-based) of every T2 drawn, for inspection
        self.teacher1: Dict[str, torch.Tensor] = {}

    def concepts(self, task: TaskData, m: int) -> List[str]:
        """S for DSC with T2 = LoRA_{m+1}: [c_n, c_0, c_m] + the most recent other earlier prompts, |S| = min(k, n+1).

        k = 2: [c_n, c_m]. c_m's column is `self.m_column()`.
        """
        k = self.settings.num_dc_concepts
        if k == 2:
            return [task.prompt, task.past_prompts[m]]
        others = [p for i, p in enumerate(task.past_prompts) if i != m]
        room = min(k - 3, len(others))
        return [task.prompt, task.pretrained_concept_prompt, task.past_prompts[m]] + others[len(others) - room:]

    def m_column(self) -> int:
        """Column of T2's concept c_m in `concepts`."""
        return 1 if self.settings.num_dc_concepts == 2 else 2

    def step_loss(self, task: TaskData, x0: torch.Tensor, m: int, timesteps: torch.Tensor, noise: torch.Tensor,
                  temperature: float, time_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """L_DSC on one batch with T2 = pool[m] and (t, eps) pairs shared by all four evaluations (SDXL: the
        batch's `time_ids`)."""
        return self.student_loss(self.teacher_targets(task, x0, m, timesteps, noise, temperature, time_ids=time_ids),
                                 x0, timesteps, noise, temperature)

    @torch.no_grad()
    def teacher_targets(self, task: TaskData, x0: torch.Tensor, m: int, timesteps: torch.Tensor, noise: torch.Tensor,
                        temperature: float, with_t1: bool = True, time_ids: Optional[torch.Tensor] = None) -> Dict:
        """What the student matches for T2 = pool[m]: each teacher's DC log-probs over S and its noise prediction
        under its own concept (T1 under c_n, T2 under c_m); T1's are left out with `with_t1` False. The teachers
        are swapped into the U-Net in place, so every teacher of a step is read before any student pass. The
        targets keep the conditions and the batch's (SDXL) time ids for the student's pass."""
        models, settings = self.models, self.settings
        unet, scheduler = models.unet, models.noise_scheduler
        conds = models.encode(self.concepts(task, m))
        targets = {"conds": conds, "time_ids": time_ids}
        for name, lora, column in (("t1", self.teacher1, 0), ("t2", self.pool[m], self.m_column())):
            if name == "t1" and not with_t1:
                continue
            with swapped_lora(unet, lora):
                if settings.dc_denoise_rows:  # eps read from the DC pass's own rows
                    targets[f"p_{name}"], (targets[f"eps_{name}"],) = dc_log_probs_and_rows(
                        unet, scheduler, x0, conds, timesteps, noise, temperature, (column,), settings.dc_loss,
                        settings.dc_max_batch, time_ids)
                else:
                    targets[f"p_{name}"] = dc_log_probs(unet, scheduler, x0, conds, timesteps, noise, temperature,
                                                        settings.dc_loss, settings.dc_max_batch, time_ids)
                    targets[f"eps_{name}"] = predict_rows(unet, scheduler, x0, conds[column], timesteps, noise,
                                                          time_ids)
        return targets

    def student_loss(self, targets: Dict[str, torch.Tensor], x0: torch.Tensor, timesteps: torch.Tensor,
                     noise: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The live LoRA's (the student's) DSC terms against `teacher_targets`: KL(p_T || p_S) for each teacher's
        DC scores, ||eps_S - eps_T||^2 under each teacher's concept; the T1 terms where the targets hold T1."""
        models, settings = self.models, self.settings
        unet, scheduler = models.unet, models.noise_scheduler
        conds, time_ids = targets["conds"], targets["time_ids"]
        teachers = [("t1", 0)] if "p_t1" in targets else []
        teachers.append(("t2", self.m_column()))
        if settings.dc_denoise_rows:
            p_s, rows = dc_log_probs_and_rows(unet, scheduler, x0, conds, timesteps, noise, temperature,
                                              [column for _, column in teachers], settings.dc_loss,
                                              settings.dc_max_batch, time_ids, checkpoint=settings.dc_checkpoint)
        else:
            p_s = dc_log_probs(unet, scheduler, x0, conds, timesteps, noise, temperature, settings.dc_loss,
                               settings.dc_max_batch, time_ids, checkpoint=settings.dc_checkpoint)
            rows = [predict_rows(unet, scheduler, x0, conds[column], timesteps, noise, time_ids,
                                 settings.dc_max_batch, checkpoint=settings.dc_checkpoint)
                    for _, column in teachers]
        parts = {}
        for (name, _), eps_s in zip(teachers, rows):  # KL(p_T || p_S): the student matches each teacher's scores
            parts[f"dsc_kl_{name}"] = F.kl_div(p_s, targets[f"p_{name}"], log_target=True,
                                               reduction="batchmean").float()  # float64 inside
            parts[f"dsc_mse_{name}"] = F.mse_loss(eps_s.float(), targets[f"eps_{name}"].float())
        loss = sum(settings.dsc_alpha * v if k.startswith("dsc_kl") else settings.dsc_beta * v for k, v in parts.items())
        return loss, {k: v.item() for k, v in parts.items()}

    def mean_loss(self, task: TaskData, x0: torch.Tensor, teachers: List[int], timesteps: torch.Tensor,
                  noise: torch.Tensor, temperature: float, with_t1: bool = True,
                  time_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """L_DSC averaged over the T2 teachers pool[m], m in `teachers`, one (t, eps) draw for all (without the
        T1 terms when `with_t1` is False), and its parts. Every teacher is read before any student pass."""
        targets = [self.teacher_targets(task, x0, m, timesteps, noise, temperature, with_t1, time_ids)
                   for m in teachers]
        return self.mean_student_loss(targets, x0, timesteps, noise, temperature)

    def mean_student_loss(self, targets: List[Dict[str, torch.Tensor]], x0: torch.Tensor, timesteps: torch.Tensor,
                          noise: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, Dict[str, float]]:
        """`student_loss` averaged over the teachers' `targets` (read first, all of them), and its parts."""
        total, parts = 0.0, {}
        for target in targets:
            loss, logs = self.student_loss(target, x0, timesteps, noise, temperature)
            total = total + loss / len(targets)
            for key, value in logs.items():
                parts[key] = parts.get(key, 0.0) + value / len(targets)
        return total, parts

    def draw_teachers(self, task: TaskData) -> List[int]:
        """This step's T2 teachers: every earlier LoRA ("all"), or one drawn from the shared stream (the same on
        every process)."""
        if self.settings.dsc_teachers == "all":
            teachers = list(range(len(self.pool)))
        else:
            teachers = [int(torch.randint(len(self.pool), (1,), generator=task.shared_generator))]
        self.draws += [m + 1 for m in teachers]
        return teachers

    def distill(self, task: TaskData, temperature: float, penalty: Optional[Callable[[], torch.Tensor]] = None,
                log: Optional[LogParts] = None) -> Dict[str, float]:
        """M iterations of L_DSC (+ `penalty()`) on the student (the live LoRA), starting from T1 = LoRA_n;
        `log(parts)` receives each iteration's terms. Returns the last iteration's."""
        models, config, settings = self.models, self.config, self.settings
        self.teacher1 = lora_state(models.unet)
        if not self.pool or settings.dsc_iterations == 0:
            return {}
        params = list(models.lora().values())
        accelerator = models.accelerator
        optimizer = accelerator.prepare(torch.optim.AdamW(
            params, lr=settings.dsc_learning_rate or config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon))
        batch = min(config.train_batch_size, task.latents.shape[0])
        logs: Dict[str, float] = {}
        for _ in tqdm(range(settings.dsc_iterations), desc=f"task {task.index} DSC distillation", leave=False,
                      disable=not models.shows_progress):
            teachers = self.draw_teachers(task)
            ids = torch.randint(task.latents.shape[0], (batch,), generator=task.generator)
            x0 = task.latents[ids]
            timesteps, noise = random_pairs(models.noise_scheduler, x0, settings.num_dc_timesteps, task.generator)
            with accelerator.autocast():
                loss, logs = self.mean_loss(task, x0, teachers, timesteps, noise, temperature,
                                            time_ids=task.time_ids_of(ids))
                logs["dsc_loss"] = loss.item()
                if penalty is not None:
                    extra = penalty()
                    loss = loss + extra
                    logs["dsc_penalty"] = extra.item()
            if not torch.isfinite(accelerator.reduce(loss.detach().float(), reduction="mean")):
                raise FloatingPointError(f"DSC loss became {loss.item()} in task {task.index}; lower dsc_learning_rate")
            accelerator.backward(loss)
            models.average_gradients(params)
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if log is not None:
                log(dict(logs))
        return logs

    def interleaved_targets(self, task: TaskData, x0: torch.Tensor, temperature: float) -> Optional[tuple]:
        """With dsc_schedule "interleaved" from task 2 on: this step's teachers read on its batch (one (t, eps)
        draw for all), before the step's own loss runs the student (a teacher swap is in place, so it must come
        before any graph of the live LoRA); None otherwise."""
        if self.settings.dsc_schedule != "interleaved" or not self.pool:
            return None
        teachers = self.draw_teachers(task)
        timesteps, noise = random_pairs(self.models.noise_scheduler, x0, self.settings.num_dc_timesteps, task.generator)
        targets = [self.teacher_targets(task, x0, m, timesteps, noise, temperature, with_t1=False,
                                        time_ids=task.batch_time_ids) for m in teachers]
        return targets, timesteps, noise

    def with_interleaved(self, pending: Optional[tuple], x0: torch.Tensor, temperature: float, loss: torch.Tensor,
                         logs: Dict[str, float]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """A training step's `loss` plus the student's T2 terms against `interleaved_targets`, averaged over the
        teachers (`loss` as it is when there are none)."""
        if pending is None:
            return loss, logs
        targets, timesteps, noise = pending
        distill, parts = self.mean_student_loss(targets, x0, timesteps, noise, temperature)
        return loss + distill, {**logs, **parts}

    def consolidate(self, task: TaskData, temperature: float, penalty: Optional[Callable[[], torch.Tensor]] = None,
                    log: Optional[LogParts] = None) -> Dict[str, float]:
        """After the task: `distill` (dsc_schedule "after"), or, when the distillation ran inside the task's steps,
        only T1 = the task's LoRA kept for the pool."""
        if self.settings.dsc_schedule == "after":
            return self.distill(task, temperature, penalty, log)
        self.teacher1 = lora_state(self.models.unet)
        return {}

    def consolidation_steps(self) -> int:
        """Steps run after each task: M with dsc_schedule "after", none when interleaved."""
        return self.settings.dsc_iterations if self.settings.dsc_schedule == "after" else 0

    def remember(self) -> None:
        """Add the task's LoRA to the pool: T1 (before distillation) or the student, per dsc_teacher_pool."""
        before = self.settings.dsc_teacher_pool == "before_distill"
        self.pool.append(dict(self.teacher1) if before else lora_state(self.models.unet))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"pool.{i}.{k}": v for i, lora in enumerate(self.pool) for k, v in lora.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        count = len({k.split(".")[1] for k in state if k.startswith("pool.")})
        self.pool = [{k[len(f"pool.{i}."):]: v.clone() for k, v in state.items() if k.startswith(f"pool.{i}.")}
                     for i in range(count)]


class DSC(Method):
    """Sequential LoRA training, DSC consolidation after every task."""

    name = "dsc"
    Settings = DSCSettings

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.distiller = Distiller(config, self.settings, models)

    def begin_task(self, task: TaskData) -> None:
        super().begin_task(task)
        self.temperature = measure_temperature(self.settings, self.models, task)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        pending = self.distiller.interleaved_targets(self.task, x0, self.temperature)
        denoise, logs = super().loss(x0)
        return self.distiller.with_interleaved(pending, x0, self.temperature, denoise, logs)

    def end_task(self, task: TaskData, log: Optional[LogParts] = None) -> Dict[str, float]:
        metrics = self.distiller.consolidate(task, self.temperature, log=log)
        self.distiller.remember()
        return {**metrics, "temperature": self.temperature}

    def consolidation_steps(self) -> int:
        return self.distiller.consolidation_steps()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.distiller.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.distiller.load_state_dict(state)


class DSCEWCDC(EWCDC):
    """EWC-DC training; after each task DSC distils (with the EWC-DC penalty unless dsc_ewc_penalty is false),
    then the EWC-DC Fisher is taken at the student."""

    name = "dsc+ewc-dc"
    Settings = DSCEWCDCSettings

    def __init__(self, config, models: Models):
        super().__init__(config, models)
        self.distiller = Distiller(config, self.settings, models)

    def loss(self, x0: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        pending = self.distiller.interleaved_targets(self.task, x0, self.temperature)
        total, logs = super().loss(x0)
        return self.distiller.with_interleaved(pending, x0, self.temperature, total, logs)

    def end_task(self, task: TaskData, log: Optional[LogParts] = None) -> Dict[str, float]:
        penalty = self.penalty if self.settings.dsc_ewc_penalty else None
        metrics = self.distiller.consolidate(task, self.temperature, penalty, log)
        metrics.update(super().end_task(task))
        self.distiller.remember()
        return metrics

    def consolidation_steps(self) -> int:
        return self.distiller.consolidation_steps()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {**super().state_dict(), **self.distiller.state_dict()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("pool.")})
        self.distiller.load_state_dict({k: v for k, v in state.items() if k.startswith("pool.")})
