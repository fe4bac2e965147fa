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
    assert rows["ewc-dc"]["rows_no_grad"] == rows["ewc-dc"]["rows_grad"] - 1 == 16  # k*T = 4*4, + the denoising row
    estimates = {row["method"]: row for row in result["h100_estimate"]}
    assert sorted(estimates) == sorted(METHODS)
    assert all(row[column] > 0 for row in estimates.values() for column in GPU_COLUMNS[1:])
    assert result["summary"]["max_step_ratio_vs_lora"] > 1


def test_arch_is_refused_where_it_does_not_apply(capsys):
    assert main(["bench", "fisher", "--quick", "--arch", "sd15"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["bench", "train", "--quick", "--latent_size", "8"]) == 2
    assert "--latent_size" in capsys.readouterr().err


def test_checkpointed_calls_keep_the_gradients_and_count_recomputed_rows(unet, scheduler):
    import copy

    import torch

    from dcfast.bench.train_arch import CheckpointedCalls, RowCounter
    from dcfast.engine.scores import dc_scores
    from dcfast.training.adapters import add_lora, lora_parameters

    model = copy.deepcopy(unet)
    add_lora(model, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    wrapped = CheckpointedCalls(model, rows=2)
    counter = RowCounter(model, lambda: wrapped.recomputing)
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
