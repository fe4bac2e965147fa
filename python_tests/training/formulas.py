"""docs/design.md's formulas written as plain loops, for the method tests' expected values; and a toy method.

Nothing here calls dcfast's score engine or a method's own helpers: one U-Net call per (image,
concept, pair), prompts given by the caller.
"""
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from dcfast.training.adapters import add_lora
from dcfast.training.config import TrainConfig
from dcfast.training.methods import Models, TaskData, get_method
from dcfast.models.tiny import tiny

PROMPT, CLASS_PROMPT = "a photo of my dog", "a photo of a dog"  # c_n, c_0 of the toy task
# The toy model's DC error gaps between concepts are ~2.5e-3 (its "auto" tau): at this tau its softmaxes are
# neither uniform nor saturated, so the pull, push and KL terms are all far from their limits.
TAU = 5e-3


def toy_method(name, index=2, past=("a photo of red cat",), rank=2, alpha=2, prediction_type="epsilon", **fields):
    """`name` on the tiny model with a random (non-zero) LoRA, begun on task `index` of a 'dog' run.

    `prediction_type`: the scheduler's, "epsilon" or "v_prediction" (the same U-Net read as a v model).

    Returns (method, LoRA parameters by name, task). Three 8x8 latents; earlier prompts `past`.
    """
    pipe = tiny(seed=0)
    add_lora(pipe.unet, rank, alpha, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    torch.manual_seed(1)
    pipe.unet.requires_grad_(False)
    params = {n: p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.2).requires_grad_(True)
    models = Models(pipe.unet, pipe.text_encoder.requires_grad_(False), pipe.tokenizer,
                    DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type), Accelerator())
    own = TrainConfig(method=name).flat()
    values = dict(method=name, rank=rank, lora_alpha=alpha)
    values.update({k: v for k, v in dict(temperature=TAU, num_dc_concepts=3, fisher_num_timesteps=2).items() if k in own})
    values.update(fields)
    method = get_method(name)(TrainConfig.from_dict(values), models)
    task = TaskData(index=index, latents=torch.randn(3, 4, 8, 8), prompt=PROMPT, pretrained_concept_prompt=CLASS_PROMPT,
                    past_prompts=list(past), generator=torch.Generator().manual_seed(2),
                    shared_generator=torch.Generator().manual_seed(3), seed=4)
    method.begin_task(task)
    return method, params, task


def set_lora(params, state):
    """Copy LoRA tensors `state` (by name) into the live parameters."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def encode(models, prompts):
    """The prompts' hidden states (K, L, D): the references below are SD 1.x loops."""
    with torch.no_grad():
        return models.encode(list(prompts)).hidden


def predictions(models, x0, cond, timesteps, noise):
    """eps_theta(x_t[b,j], c, t[b,j]) with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, one call per (b, j); (B, T, C, H, W)."""
    abar = models.noise_scheduler.alphas_cumprod
    out = []
    for b in range(x0.shape[0]):
        row = []
        for j in range(timesteps.shape[1]):
            a = abar[timesteps[b, j]]
            x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b, j]
            row.append(models.unet(x_t[None], timesteps[b, j][None], encoder_hidden_states=cond[None]).sample[0])
        out.append(torch.stack(row))
    return torch.stack(out)


def targets(models, x0, timesteps, noise):
    """What the model predicts, per (b, j): eps, or for v-prediction v = sqrt(abar) eps - sqrt(1 - abar) x0; (B, T, C, H, W)."""
    if models.noise_scheduler.config.prediction_type == "epsilon":
        return noise
    abar = models.noise_scheduler.alphas_cumprod
    out = torch.empty_like(noise)
    for b in range(x0.shape[0]):
        for j in range(timesteps.shape[1]):
            a = abar[timesteps[b, j]]
            out[b, j] = a.sqrt() * noise[b, j] - (1 - a).sqrt() * x0[b]
    return out


def errors(models, x0, conds, timesteps, noise):
    """err[b, k, j] = mean over pixels of (target[b,j] - model(x_t[b,j], c_k, t[b,j]))^2; (B, K, T)."""
    target = targets(models, x0, timesteps, noise)
    return torch.stack([(target - predictions(models, x0, c, timesteps, noise)).pow(2).flatten(2).mean(-1)
                        for c in conds], dim=1)


def log_probs(models, x0, conds, timesteps, noise, temperature):
    """log p(c_k | x0[b]) = log_softmax_k(-mean_j err[b,k,j] / tau); (B, K)."""
    return torch.log_softmax(-errors(models, x0, conds, timesteps, noise).mean(-1) / temperature, dim=-1)
