"""Evaluation test helpers (not collected): toy models and fake run directories, built in code.

- `ToyDenoiser`: the exact noise predictor of a point-mass concept, eps = (x_t - sqrt(abar) mu(c)) /
  sqrt(1 - abar), where mu(c) is a colour read out linearly from the condition. Its readout is "trained"
  in closed form (least squares) so that each concept's prompt maps to that concept's colour. DC errors
  are then lowest under the right prompt by a clear margin, and DDIM samples are that colour.
- `make_run`: a finished run in `dcfast.io.runs`' layout (run.json with config and tasks; task_{j}/ with
  pytorch_lora_weights.safetensors and metrics.json; concept folders with held-out images), plus a
  "toy" entry in run.json saying which model to build. `forget > 0` makes later states drift earlier
  concepts to grey.
- `load_toy_pipeline`: what evaluation's `load_pipeline` becomes in these tests: the real file checks
  (metrics.json present, LoRA file readable), then the toy model of that state.
"""
from __future__ import annotations

import json
import os
import string
import types
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dcfast.models.tiny import tiny_scheduler

RED, BLUE, GREEN, GREY = (0.85, 0.15, 0.15), (0.15, 0.2, 0.85), (0.15, 0.8, 0.2), (0.5, 0.5, 0.5)


class ToyDenoiser(ModelMixin, ConfigMixin):
    """Exact eps-prediction of point-mass concepts whose colour is a linear readout of the condition."""

    @register_to_config
    def __init__(self, in_channels: int = 3, sample_size: int = 8, cross_attention_dim: int = 32):
        super().__init__()
        self.readout = torch.nn.Linear(cross_attention_dim, in_channels)
        self.register_buffer("alphas_cumprod", tiny_scheduler().alphas_cumprod.clone())

    def colour(self, cond: torch.Tensor) -> torch.Tensor:
        """mu(c) in model space [-1, 1], (B, C, 1, 1)."""
        return self.readout(cond.float().mean(1))[:, :, None, None]

    def fit(self, cond: torch.Tensor, colours: torch.Tensor) -> None:
        """Least-squares readout so that colour(cond[k]) = 2 colours[k] - 1."""
        feats = torch.cat([cond.double().mean(1), torch.ones(cond.shape[0], 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(feats, 2 * colours.double() - 1, driver="gelsd").solution
        with torch.no_grad():
            self.readout.weight.copy_(sol[:-1].T)
            self.readout.bias.copy_(sol[-1])

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device).long().expand(sample.shape[0])
        abar = self.alphas_cumprod[t].to(sample.dtype).view(-1, 1, 1, 1)
        eps = (sample - abar.sqrt() * self.colour(encoder_hidden_states)) / (1 - abar).sqrt()
        return types.SimpleNamespace(sample=eps) if return_dict else (eps,)


def tokenizer(folder: str, tokens: Sequence[str]) -> CLIPTokenizer:
    """A character-level CLIPTokenizer (no merges) with the modifier tokens added, 16 tokens long."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "<>":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=16)
    tok.add_tokens(list(tokens))
    return tok


def text_encoder(vocab_size: int, num_tokens: int, seed: int = 0) -> CLIPTextModel:
    """Tiny CLIP text encoder; modifier tokens (the last ids) get distinct, learned-looking embeddings."""
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[vocab_size - num_tokens:] = 3 * torch.randn(num_tokens, weight.shape[1])
    return model


def tiny_unet_and_vae(seed: int = 0):
    """A random latent-space tiny U-Net (8x8x4 latents) and VAE (16x16 images)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16).eval()
    return unet, vae


def write_concept_folder(folder: str, colour, n: int, seed: int, size: int = 16) -> None:
    """n PNGs of a colour with mild texture."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        img = (torch.tensor(colour).view(3, 1, 1) + 0.05 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{k:02d}.png"))


def make_run(root: str, colours=(RED, BLUE), model: str = "toy", forget: float = 0.0,
             held_out: bool = True, method: str = "lora", n_eval: int = 4) -> str:
    """Write a finished run of len(colours) tasks under root; returns root."""
    tasks = []
    for j, colour in enumerate(colours, 1):
        task_dir = os.path.join(root, f"task_{j}")
        os.makedirs(task_dir, exist_ok=True)
        save_file({"lora.weight": torch.zeros(2, 2)}, os.path.join(task_dir, "pytorch_lora_weights.safetensors"))
        with open(os.path.join(task_dir, "metrics.json"), "w") as f:
            json.dump({"task": j, "seconds": 1.5 * j}, f)
        data = os.path.join(root, "data", f"concept_{j}")
        write_concept_folder(os.path.join(data, "train"), colour, 3, seed=j)
        if held_out:
            write_concept_folder(os.path.join(data, "eval"), colour, n_eval, seed=100 + j)
        tasks.append({"index": j, "token": f"<v{j}>", "class_word": "dog", "prompt": f"a photo of <v{j}> dog",
                      "class_prompt": "a photo of a dog", "images": os.path.join(data, "train"),
                      "eval_images": os.path.join(data, "eval") if held_out else None})
    toy = {"colours": [list(c) for c in colours], "model": model, "forget": forget}
    with open(os.path.join(root, "run.json"), "w") as f:
        json.dump({"config": {"method": method}, "tasks": tasks, "toy": toy}, f)
    return root


def load_toy_pipeline(run_dir: str, task_index: int, device: str = "cpu"):
    from dcfast.io import runs

    tasks = runs.Run(run_dir).tasks()
    spec = runs.read_json(os.path.join(run_dir, runs.RUN_FILE))["toy"]
    folder = runs.task_dir(run_dir, task_index)
    if not (folder / runs.METRICS_FILE).is_file():
        raise FileNotFoundError(f"task {task_index} is not finished: missing {str(folder / runs.METRICS_FILE)!r}")
    runs.load_tensors(folder / runs.LORA_FILE)
    tok = tokenizer(os.path.join(run_dir, "_tokenizer"), [t.token for t in tasks[:task_index]])
    encoder = text_encoder(len(tok), task_index)
    scheduler = DDPMScheduler.from_config(tiny_scheduler().config, steps_offset=1)
    if spec["model"] == "toy":
        unet, vae = ToyDenoiser(), None
        from dcfast.eval.sampling import pipeline_conditions
        pipe_stub = types.SimpleNamespace(tokenizer=tok, text_encoder=encoder, unet=unet)
        seen = tasks[:task_index]
        cond = pipeline_conditions(pipe_stub, [t.prompt for t in seen] + ["a photo of a dog", ""]).hidden
        # state j knows concept i's colour drifted toward grey by forget * (j - i)
        drift = torch.tensor([min(1.0, spec["forget"] * (task_index - t.index)) for t in seen])[:, None]
        colours = (1 - drift) * torch.tensor([spec["colours"][t.index - 1] for t in seen]) + drift * torch.tensor(GREY)
        unet.fit(cond, torch.cat([colours, torch.tensor([GREY, GREY])]))
    else:
        unet, vae = tiny_unet_and_vae()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device)
