"""`dcfast bench train --arch sd15 --quick`: every method measured on the real SD 1.5 architecture (random weights),
at 8x8 latents here; minutes on 2 cores and ~5 GB per worker, so marked slow (`python -m pytest -m slow ...`)."""
import json

import pytest

from dcfast.bench.train_arch import GPU_COLUMNS, METHODS
from dcfast.cli.main import main


@pytest.mark.slow
def test_quick_sd15_measures_every_method(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--arch", "sd15", "--quick", "--latent_size", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--quick: 8x8 latents, 1 timed step each" in printed and "ESTIMATE, not a measurement" in printed
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(METHODS) and result["summary"]["failed"] == []
    for row in rows.values():
        assert row["steps"] == 1 and row["latents"] == "8x8"
        assert row["step_s"] > 0 and row["ratio_vs_lora"] > 0 and row["rows_grad"] > 0
        assert 0 < row["base_rss_gb"] < row["setup_rss_gb"] and 0.99 * row["setup_rss_gb"] <= row["peak_rss_gb"] < 16
    # k*T = 4*4 DC rows in dc_checkpoint chunks, + the denoising row; the chunks run again in the backward
    assert (rows["ewc-dc"]["rows_no_grad"], rows["ewc-dc"]["rows_grad"], rows["ewc-dc"]["rows_recomputed"]) == (0, 17, 16)
    estimates = {row["method"]: row for row in result["h100_estimate"]}
    assert sorted(estimates) == sorted(METHODS)
    assert all(row[column] > 0 for row in estimates.values() for column in GPU_COLUMNS[1:])
    assert result["summary"]["max_step_ratio_vs_lora"] > 1


def test_arch_is_refused_where_it_does_not_apply(capsys):
    assert main(["bench", "fisher", "--quick", "--arch", "sd15"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["bench", "train", "--quick", "--latent_size", "8"]) == 2
    assert "--latent_size" in capsys.readouterr().err
    assert main(["bench", "methods", "--quick", "--mixed_precision", "bf16"]) == 2
    assert "--mixed_precision" in capsys.readouterr().err
    # before any worker starts: an unknown method, a latent side the U-Nets cannot halve three times
    assert main(["bench", "train", "--arch", "sdxl", "--method", "ewc"]) == 2
    assert "bench train --arch measures lora, ewc-dc, dsc; unknown ['ewc']" in capsys.readouterr().err
    assert main(["bench", "train", "--arch", "sdxl", "--latent_size", "12"]) == 2
    assert "--latent_size: a multiple of 8" in capsys.readouterr().err
    assert main(["bench", "train", "--quick", "--method", "lora"]) == 2
    assert "--method: the tiny model's bench trains every method" in capsys.readouterr().err


def test_checkpointed_calls_keep_the_gradients_and_count_recomputed_rows(unet, scheduler):
    import copy

    import torch

    from dcfast.bench.train_arch import CheckpointedCalls, RowCounter
    from dcfast.engine.scores import dc_scores
    from dcfast.training.adapters import add_lora, lora_parameters

    model = copy.deepcopy(unet)
    add_lora(model, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    wrapped = CheckpointedCalls(model, rows=2)
    counter = RowCounter(model)
    x, t, cond = torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 900]), torch.randn(3, 8, 32)
    grads = []
    for net in (wrapped, model):
        net(x, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()
        grads.append({name: p.grad.clone() for name, p in lora_parameters(model).items()})
        model.zero_grad(set_to_none=True)
    assert all(torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7) for name in grads[0])
    assert any(bool(g.any()) for g in grads[0].values())
    assert (counter.grad, counter.recomputed, counter.no_grad) == (6, 3, 0)  # pieces of 2 + 1 rows
    with torch.no_grad():  # the DC engine reads the wrapped U-Net's config and calls it plainly
        err, plain = (dc_scores(net, scheduler, x[:1], cond[:2], num_timesteps=2,
                                generator=torch.Generator().manual_seed(0), **extra)
                      for net, extra in ((wrapped, {}), (model, {"share": ()})))
    assert torch.allclose(err, plain, rtol=1e-5, atol=1e-7) and counter.no_grad == 2 * 4


@pytest.fixture
def tiny_sdxl_arch(monkeypatch):
    """The tiny SDXL (`tiny_xl`) registered as an architecture, with SDXL's bench settings (bf16, checkpointing)."""
    from dcfast.bench import train_arch
    from dcfast.models import architectures
    from dcfast.models.tiny import tiny_xl

    pipe = tiny_xl()
    arch = architectures.Architecture(
        name="tiny-xl", unet_config={k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")},
        text_encoders=tuple((type(e).__name__, e.config.to_diff_dict()) for e in (pipe.text_encoder,
                                                                                 pipe.text_encoder_2)),
        scheduler_config=architectures.SD15.scheduler_config)
    monkeypatch.setitem(architectures.ARCHITECTURES, arch.name, arch)
    monkeypatch.setitem(train_arch.ARCH_SETTINGS, arch.name, dict(train_arch.ARCH_SETTINGS["sdxl"]))
    return arch.name


@pytest.mark.parametrize("method, rows, prompts", [
    # lora: one row with grad, its blocks recomputed by gradient checkpointing; c_n through both encoders with grad
    ("lora", (0, 1, 1), ([0, 0], [1, 1])),
    # ewc-dc: k*T = 16 DC rows in 1-row dc_checkpoint chunks + the denoising row, with grad; in the backward the 16
    # chunks run again, and then every row's blocks (gradient checkpointing inside): 16 + 17 recomputations;
    # S's k = 4 prompts and c_n with grad (c_n's token trains)
    ("ewc-dc", (0, 17, 33), ([0, 0], [5, 5])),
    # dsc: one distillation iteration, as the trainer's consolidation without gradient checkpointing: its 24 rows
    # with grad recomputed whole by CheckpointedCalls; the 4 prompts' tokens are frozen
    ("dsc", (40, 24, 24), ([4, 4], [0, 0])),
])
def test_sdxl_step_runs_the_trainers_bf16_sdxl_path(tiny_sdxl_arch, tmp_path, method, rows, prompts):
    import torch

    from dcfast.bench.train_arch import _setup
    from dcfast.training.adapters import lora_parameters

    step, counter, prompt_counter, _, model = _setup(method, tiny_sdxl_arch, 8, str(tmp_path), "bf16")
    seen = []

    def record(module, args, kwargs, output):
        seen.append(kwargs["added_cond_kwargs"])

    handle = model.register_forward_hook(record, with_kwargs=True)  # (turns the DC engine's shares off: no count changes)
    counter.reset()
    prompt_counter.reset()
    try:
        step()
    finally:
        handle.remove()
    measured = (counter.no_grad, counter.grad, counter.recomputed)
    assert measured == rows
    assert (prompt_counter.no_grad, prompt_counter.grad) == prompts
    # every U-Net call had SDXL's added conditions: both encoders' pooled embedding and the 64x64 photo's time ids
    assert seen and all(c["time_ids"].reshape(-1, 6)[0].tolist() == [64, 64, 0, 0, 64, 64] for c in seen)
    trained = lora_parameters(model)
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in trained)
