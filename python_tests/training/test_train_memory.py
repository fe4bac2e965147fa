"""Memory: frozen weights in the weight dtype under mixed precision, gradient checkpointing, allow_tf32, 8-bit Adam."""
import importlib.machinery
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml

from dcfast.io.runs import load_tensors, task_dir
from dcfast.training.trainer import train

# Run in a fresh interpreter (accelerate fixes mixed precision per process): records, at every step, the dtype of
# every frozen and trainable tensor, then prints them as JSON on the last line.
DTYPE_PROBE = r"""
import json, sys
from dcfast.training.config import TrainConfig
from dcfast.training.trainer import train

seen = {}
def probe(task, step, models):
    unet = dict(models.unet.named_parameters())
    lora = {n for n in unet if ".lora_A." in n or ".lora_B." in n}
    seen[f"{task}.{step}"] = {
        "unet_base": sorted({str(p.dtype) for n, p in unet.items() if n not in lora}),
        "lora": sorted({str(unet[n].dtype) for n in lora}),
        "text_encoder": sorted({str(p.dtype) for p in models.text_encoder.parameters()}),
        "token": str(models.token.param.dtype),
        "token_grad": str(models.token.param.grad.dtype) if models.token.param.grad is not None else None,
    }
    seen["vae"] = sorted({str(p.dtype) for p in probe.vae.parameters()})

import dcfast.training.trainer as trainer
load = trainer.load_components
def load_and_keep(*args, **kwargs):
    components = load(*args, **kwargs)
    probe.vae = components.vae
    return components
trainer.load_components = load_and_keep
result = train(TrainConfig.from_yaml(sys.argv[1]), step_callback=probe)
seen["final_loss"] = [m["final_loss"] for m in result.metrics]
print(json.dumps(seen))
"""


def test_mixed_precision_casts_frozen_weights_not_the_trained_ones(make_config, tmp_path):
    config = make_config("dsc+ewc-dc", max_train_steps=1, dsc_iterations=1, mixed_precision="bf16")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run([sys.executable, "-c", DTYPE_PROBE, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for step in ("1.1", "2.1"):
        assert seen[step]["unet_base"] == ["torch.bfloat16"]  # diffusers' weight_dtype
        assert seen[step]["text_encoder"] == ["torch.bfloat16"]
        assert seen[step]["lora"] == ["torch.float32"]  # what trains stays fp32, as cast_training_params leaves it
        assert seen[step]["token"] == "torch.float32"
    assert seen["vae"] == ["torch.bfloat16"]
    assert all(torch.isfinite(torch.tensor(seen["final_loss"])))
    for n in (1, 2):  # what is written is fp32 (the LoRA file, the token, the Fisher)
        folder = task_dir(config.output_dir, n)
        for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "fisher.safetensors"):
            assert {t.dtype for t in load_tensors(folder / name).values()} == {torch.float32}, name


def test_gradient_checkpointing_recomputes_and_changes_nothing(make_config, tmp_path):
    """Same outputs with and without checkpointing (the Fisher too: its phase runs without), and the U-Net's
    first transformer block really runs twice per training step with it (forward, then again in the backward)."""
    calls = {}

    def run(checkpointing: bool):
        config = make_config("ewc", output_dir=str(tmp_path / str(checkpointing)), max_train_steps=2,
                             gradient_checkpointing=checkpointing)
        counts = []

        def callback(task, step, models):
            if not counts:  # first call: count the resnet's forwards from here on
                # the first transformer block holds LoRA layers, so its backward needs its activations. A pre-hook:
                # the recomputation stops early, once it has what the backward needs (a post-hook would not fire)
                block = models.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                block.register_forward_pre_hook(lambda *a: counts.append(1))
                counts.append(0)
            calls.setdefault(checkpointing, []).append((models.unet.is_gradient_checkpointing, len(counts)))

        train(config, step_callback=callback)
        return config

    plain, checkpointed = run(False), run(True)
    # per step: denoise (1 U-Net forward) -> 1 block call, 2 with recomputation; task 2 adds Fisher calls before
    # its first step, so compare the steps inside task 1 and inside task 2
    for flag, per_step in ((False, 1), (True, 2)):
        states, counts = zip(*calls[flag])
        assert all(s == flag for s in states)
        assert counts[1] - counts[0] == per_step and counts[3] - counts[2] == per_step
    for n in (1, 2):
        for name in ("pytorch_lora_weights.safetensors", "fisher.safetensors", "learned_embeds.safetensors"):
            a = load_tensors(task_dir(plain.output_dir, n) / name)
            b = load_tensors(task_dir(checkpointed.output_dir, n) / name)
            assert a.keys() == b.keys()
            for key in a:
                scale = a[key].abs().max().item()
                torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=max(1e-6 * scale, 1e-30))


def test_allow_tf32_is_set_for_the_run_and_restored(make_config):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        during = []
        train(make_config("lora", words=("dog",), max_train_steps=1, allow_tf32=True),
              step_callback=lambda *a: during.append((torch.backends.cuda.matmul.allow_tf32,
                                                      torch.backends.cudnn.allow_tf32)))
        assert during == [(True, True)]
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_use_8bit_adam_without_bitsandbytes_is_named(make_config, monkeypatch):
    import dcfast.training.preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(dcfast.training.preflight.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"use_8bit_adam: needs bitsandbytes, which is not installed; pip install "
                                         r"bitsandbytes, or set use_8bit_adam: false"):
        make_config(use_8bit_adam=True).validate()


def test_use_8bit_adam_uses_bitsandbytes_adamw8bit(make_config, monkeypatch):
    """With bitsandbytes importable, each task's optimizer is its AdamW8bit, over the LoRA and the token."""
    built = []

    class AdamW8bit(torch.optim.AdamW):  # stands in for bitsandbytes.optim.AdamW8bit (same constructor)
        def __init__(self, groups, **kwargs):
            built.append(([len(g["params"]) for g in groups], [g["lr"] for g in groups], kwargs))
            super().__init__(groups, **kwargs)

    module = types.ModuleType("bitsandbytes")
    module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    module.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)
    config = make_config("lora", max_train_steps=1, use_8bit_adam=True, learning_rate=2e-3, token_learning_rate=4e-3)
    train(config)
    assert len(built) == 2  # one optimizer per task
    sizes, rates, kwargs = built[0]
    assert sizes[1] == 1 and sizes[0] > 1 and rates == [2e-3, 4e-3]
    assert kwargs["betas"] == (config.adam_beta1, config.adam_beta2) and kwargs["eps"] == config.adam_epsilon


def test_fp16_without_autocast_keeps_weights_fp32(make_config, tmp_path):
    """accelerate turns fp16 autocast off on the CPU: the run must not cast (fp16 weights would meet fp32 inputs).
    The GPUs are hidden from the run, so that it is on the CPU on any machine."""
    config = make_config("lora", words=("dog",), max_train_steps=1, mixed_precision="fp16")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run([sys.executable, "-c", DTYPE_PROBE, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["1.1"]["unet_base"] == ["torch.float32"] and seen["vae"] == ["torch.float32"]
    assert "the frozen weights stay fp32" in done.stderr
