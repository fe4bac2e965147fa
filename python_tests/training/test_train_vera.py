"""adapter: vera. Every method trains 2 tiny tasks with a peft VeRA adapter; only its vectors lambda_b / lambda_d move
(the shared random A, B and the base U-Net stay bit-identical, C-LoRA's merges aside); task states, resume, C-LoRA's
penalty and export, the `dcfast export` folder peft loads back, the bench flag, and the errors of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from peft import PeftModel

from dcfast.cli.main import main
from dcfast.io.runs import load_pipeline, load_tensors, task_dir
from dcfast.models.loading import load_components
from dcfast.training.adapters import add_vera, lora_layers, lora_parameters
from dcfast.training.methods import METHODS
from dcfast.training.trainer import train

VERA_FILES = {"adapter_model.safetensors", "adapter_config.json"}


def fresh_vera(config):
    """The run's base U-Net with the VeRA the run starts from (same seed: the same shared matrices)."""
    unet = load_components(config.pretrained_model_name_or_path).unet
    unet.requires_grad_(False)
    add_vera(unet, config.rank, config.target_modules, config.seed)
    return unet


def is_vector(name):
    return ".vera_lambda_b." in name or ".vera_lambda_d." in name


def unet_output(unet):
    gen = torch.Generator().manual_seed(7)
    x, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 50]), cond).sample


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_two_tasks_and_moves_only_the_vectors(make_config, method):
    config = make_config(method, adapter="vera", rank=8, learning_rate=3e-2)
    result = train(config)
    unet = result.method.models.unet
    start = fresh_vera(config)

    trained = lora_parameters(unet)
    assert trained and all(is_vector(n) for n in trained)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} <= set(trained)
    assert not [n for n, _ in unet.named_parameters() if ".vera_A" in n or ".vera_B" in n]  # buffers: never trained
    before, after = start.state_dict(), unet.state_dict()
    assert before.keys() == after.keys()
    merged = {f"{name}.base_layer.weight" for name in lora_layers(unet)} if method == "c-lora" else set()
    frozen = [k for k in before if not is_vector(k) and k not in merged]
    assert any(".vera_A." in k for k in frozen) and any(".vera_B." in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen), "a frozen weight or shared matrix moved"
    moved = {n for n in trained if not torch.equal(before[n], after[n])}
    if method == "ti":
        assert not moved  # the token alone trains
    elif method == "custom-diffusion":
        assert moved and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in moved)
    else:
        assert {n for n in moved if ".vera_lambda_b." in n}, "no lambda_b moved"

    for folder in result.task_dirs:
        names = {p.name for p in folder.iterdir()}
        assert ("pytorch_lora_weights.safetensors" in names) == (method == "c-lora")  # C-LoRA: a stacked LoRA
        assert (VERA_FILES <= names) == (method != "c-lora")
        state = load_tensors(folder / "trainer_state.safetensors")
        assert {k[len("lora."):] for k in state if k.startswith("lora.")} == set(trained)
    if method in ("ewc", "ewc-dc", "dsc+ewc-dc"):
        fisher = load_tensors(result.task_dirs[1] / "fisher.safetensors")
        assert {k[len("fisher."):] for k in fisher if k.startswith("fisher.")} == set(trained)
        assert sum(float(v.sum()) for k, v in fisher.items() if k.startswith("fisher.")) > 0
        assert set(result.method.anchor) == set(trained)
    if method in ("dsc", "dsc+ewc-dc"):
        assert [set(teacher) for teacher in result.method.distiller.pool] == [set(trained)] * 2

    # the written state, loaded as `dcfast eval` loads it, is the trained U-Net
    close(unet_output(load_pipeline(config.output_dir, 2).unet), unet_output(unet))


def test_resume_after_kill_equals_uninterrupted(make_config, tmp_path):
    class Killed(Exception):
        pass

    def kill(task, step, models):
        if (task, step) == (2, 3):
            raise Killed

    straight = make_config("ewc-dc", adapter="vera", output_dir=str(tmp_path / "straight"), max_train_steps=4,
                           checkpointing_steps=2)
    train(straight)
    killed = make_config("ewc-dc", adapter="vera", output_dir=str(tmp_path / "killed"), max_train_steps=4,
                         checkpointing_steps=2)
    with pytest.raises(Killed):
        train(killed, step_callback=kill)
    train(killed.override(resume_from_checkpoint="latest"))
    for name in ("adapter_model.safetensors", "fisher.safetensors", "trainer_state.safetensors"):
        a, b = load_tensors(task_dir(straight.output_dir, 2) / name), load_tensors(task_dir(killed.output_dir, 2) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_clora_penalty_merge_and_export_use_the_vera_update(make_config, model_dir):
    """C-LoRA's W_past and B_n A_n are VeRA's diag(lambda_b) B_s diag(lambda_d) A_s, checked against peft's own
    get_delta_weight; its export stacks them as LoRA factors whose product is the summed update."""
    config = make_config("c-lora", adapter="vera", rank=8, clora_lambda=10.0, learning_rate=3e-2)
    result = train(config)
    method, unet = result.method, result.method.models.unet
    task1 = load_tensors(task_dir(config.output_dir, 1) / "trainer_state.safetensors")
    layers = lora_layers(unet)
    base = dict(UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").named_parameters())
    live = {n: p.detach().clone() for n, p in lora_parameters(unet).items()}
    with torch.no_grad():  # peft's delta of task 1's vectors, then of the live ones
        for n, p in lora_parameters(unet).items():
            p.copy_(task1[f"lora.{n}"])
        past = {name: layer.get_delta_weight("default").clone() for name, layer in layers.items()}
        for n, p in lora_parameters(unet).items():
            p.copy_(live[n])
    assert max(d.abs().max().item() for d in past.values()) > 0
    hand = 10.0 * sum((past[name] * layer.get_delta_weight("default")).pow(2).sum() for name, layer in layers.items())
    penalty = method.penalty()
    assert hand.item() > 0
    torch.testing.assert_close(penalty, hand)
    params = list(lora_parameters(unet).values())
    for a, b in zip(torch.autograd.grad(penalty, params), torch.autograd.grad(hand, params)):
        torch.testing.assert_close(a, b)
    stacked, rank, alpha = method.export_lora()
    assert (rank, alpha) == (2 * config.rank, 2 * config.rank)  # scale 1
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base[f"{name}.weight"] + past[name])
        product = stacked[f"{name}.lora_B.default.weight"] @ stacked[f"{name}.lora_A.default.weight"]
        torch.testing.assert_close(product, past[name] + layer.get_delta_weight("default"))


def test_export_writes_what_peft_loads_and_the_card_says_how(make_config, model_dir, tmp_path, capsys):
    config = make_config("lora", adapter="vera", rank=8, max_train_steps=3, learning_rate=3e-2)
    result = train(config)
    out = tmp_path / "export"
    assert main(["export", "--run", config.output_dir, "--output", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "export.json",
                     "learned_embeds_v1.safetensors", "learned_embeds_v2.safetensors"]
    assert all(n.endswith((".safetensors", ".json", ".md")) for n in names)  # nothing pickled
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert (peft_config["peft_type"], peft_config["r"], peft_config["projection_prng_key"]) == ("VERA", 8, config.seed)
    weights = load_tensors(out / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(weights)
    assert json.loads((out / "export.json").read_text())["adapter"] == "vera"

    trained = unet_output(result.method.models.unet)
    fresh = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    untouched = unet_output(fresh)
    loaded = unet_output(PeftModel.from_pretrained(fresh, str(out)).get_base_model())
    close(loaded, trained)
    assert (trained - untouched).abs().max() > 1e3 * (loaded - trained).abs().max().clamp_min(1e-7)

    card = (out / "README.md").read_text()
    assert "diffusers has no VeRA loader" in card and "vera" in card.split("---")[1]
    code = card.split("## Loading with diffusers and peft (no dcfast needed)")[1].split("```python\n")[1].split("```")[0]
    assert "from peft import PeftModel" in code and "dcfast" not in code
    namespace = {}
    exec(compile(code, "README.md loading code", "exec"), namespace)
    pipe = namespace["pipe"]
    close(unet_output(pipe.unet), trained)
    assert len(pipe.tokenizer.tokenize("a photo of <v2> mug")) == 5


def test_bench_methods_passes_the_adapter_to_every_run(monkeypatch, tmp_path):
    from dcfast.experiments import bench_methods
    from dcfast.experiments.runner import train_config

    seen = []

    def fake_jobs(jobs, workers):
        seen.extend(jobs)
        return [{"final_fidelity": 0.5, "plasticity": 0.5, "fidelity_forgetting": 0.1, "bwt_fidelity": -0.1,
                 "train_seconds": 1.0} for _ in jobs]

    monkeypatch.setattr(bench_methods, "run_jobs", fake_jobs)
    monkeypatch.setattr(bench_methods, "write_concepts", lambda config: [{"images": "x", "class_word": "circle"}])
    result = bench_methods.run(seeds=1, quick=True, output_dir=str(tmp_path / "b"), adapter="vera")
    assert sorted(job[2] for job in seen) == sorted(METHODS)
    assert all(train_config(config, method, tasks, run_dir).adapter == "vera"
               for _, _, method, config, tasks, run_dir in seen)
    assert "--adapter vera" in json.loads((tmp_path / "b" / "methods.json").read_text())["command"]
    assert result["rows"]
    with pytest.raises(ValueError, match="adapter: 'dora' is not one of lora, vera"):
        bench_methods.run(seeds=1, quick=True, output_dir=str(tmp_path / "c"), adapter="dora")

    received = {}
    monkeypatch.setattr(bench_methods, "run", lambda **kwargs: received.update(kwargs) or {"summary": {}})
    assert main(["bench", "methods", "--adapter", "vera", "--quick"]) == 0
    assert received["adapter"] == "vera"
    assert main(["bench", "fisher", "--adapter", "vera"]) == 2  # only the methods bench reads it


def test_bad_vera_input_is_named(make_config, capsys):
    with pytest.raises(ValueError, match="lora_alpha: adapter vera has no alpha.*leave lora_alpha unset"):
        make_config("lora", adapter="vera", lora_alpha=8).validate()
    with pytest.raises(ValueError, match="adapter: 'dora' is not one of lora, vera"):
        make_config("lora", adapter="dora").validate()
    with pytest.raises(ValueError, match="target_modules: .*VeRA adapts nn.Linear layers only"):
        train(make_config("lora", adapter="vera", target_modules=["to_q", "conv1"]))


def test_train_help_shows_the_adapter_with_its_reason(capsys):
    from dcfast.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--adapter {lora,vera}" in text and "Kopiczko et al.: frozen random A, B shared by every target layer" in text
    assert "or VeRA's r (VeRA papers: 256 to 1024)" in text


# A fresh interpreter (accelerate fixes mixed precision per process): the dtypes of the U-Net's tensors after a step.
BF16_PROBE = r"""
import json, sys
from dcfast.training.config import TrainConfig
from dcfast.training.trainer import train

seen = {}
def probe(task, step, models):
    params, buffers = dict(models.unet.named_parameters()), dict(models.unet.named_buffers())
    seen[task] = {"vectors": sorted({str(p.dtype) for n, p in params.items() if ".vera_lambda_" in n}),
                  "base": sorted({str(p.dtype) for n, p in params.items() if ".vera_lambda_" not in n}),
                  "shared": sorted({str(b.dtype) for n, b in buffers.items() if ".vera_A." in n or ".vera_B." in n})}
train(TrainConfig.from_yaml(sys.argv[1]), step_callback=probe)
print(json.dumps(seen))
"""


def test_bf16_casts_the_frozen_weights_not_the_vectors(make_config, tmp_path):
    config = make_config("ewc", adapter="vera", max_train_steps=1, mixed_precision="bf16")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run([sys.executable, "-c", BF16_PROBE, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for task in ("1", "2"):
        assert seen[task] == {"vectors": ["torch.float32"], "base": ["torch.bfloat16"], "shared": ["torch.float32"]}
    fisher = load_tensors(task_dir(config.output_dir, 2) / "fisher.safetensors")
    assert all(torch.isfinite(v).all() for v in fisher.values()) and sum(float(v.sum()) for v in fisher.values()) > 0
