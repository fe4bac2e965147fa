"""`dcfast export`: a folder a plain diffusers pipeline loads into the same model as dcfast's own loading."""
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from dcfast.cli.main import main
from dcfast.io.runs import Run, load_pipeline, load_tensors, task_dir
from dcfast.training.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir, concepts):
    """A 2-task C-LoRA run (its exported LoRA stacks both tasks' factors: rank 2r, read from the file's metadata)."""
    from dcfast.training.config import TrainConfig

    out = tmp_path_factory.mktemp("export_run") / "run"
    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=str(model_dir), output_dir=str(out), method="c-lora",
        tasks=[{"images": str(concepts["dog"]), "class_word": "dog"}, {"images": str(concepts["mug"]), "class_word": "mug"}],
        max_train_steps=3, train_batch_size=2, checkpointing_steps=100, learning_rate=3e-2, token_learning_rate=3e-2,
        clora_lambda=0.0))
    train(config)
    return out


def _loading_block(card: str) -> str:
    return re.search(r"## Loading with diffusers.*?```python\n(.*?)```", card, re.S).group(1)


def _model_outputs(pipe, prompt: str):
    """Text-encoder states of `prompt` and the U-Net's prediction on fixed latents under them."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        cond = pipe.text_encoder(ids)[0]
        size = pipe.unet.config.sample_size
        latents = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(3))
        pred = pipe.unet(latents, torch.tensor([500, 100]), encoder_hidden_states=cond.expand(2, -1, -1)).sample
    return ids, cond, pred


def _close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def test_plain_diffusers_loads_the_export_like_dcfast(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(out)]) == 0
    assert "task state 2 exported" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "learned_embeds_v1.safetensors",
                                                     "learned_embeds_v2.safetensors", "pytorch_lora_weights.safetensors"]
    for i, token in ((1, "<v1>"), (2, "<v2>")):  # single-token textual-inversion files, as the run learned them
        embeds = load_tensors(out / f"learned_embeds_v{i}.safetensors")
        assert list(embeds) == [token] and embeds[token].dim() == 1
        assert torch.equal(embeds[token], load_tensors(task_dir(run, i) / "learned_embeds.safetensors")[token])
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert '"unet.r": 8' in handle.metadata()["lora_adapter_metadata"]  # C-LoRA: both tasks' rank-4 factors

    card = (out / "README.md").read_text()
    code = _loading_block(card)
    assert "dcfast" not in code  # the loading code needs diffusers only
    namespace = {}
    exec(compile(code, "README.md loading code", "exec"), namespace)
    plain = namespace["pipe"]
    ours = load_pipeline(run, 2)
    base_dir = Run(run).base_model()["name_or_path"]
    base = StableDiffusionPipeline.from_pretrained(base_dir)

    for prompt in ("a photo of <v1> dog", "a photo of <v2> mug"):
        ids_plain, cond_plain, pred_plain = _model_outputs(plain, prompt)
        ids_ours, cond_ours, pred_ours = _model_outputs(ours, prompt)
        assert torch.equal(ids_plain, ids_ours)
        assert len(plain.tokenizer.tokenize(prompt)) == 5  # the token is one token, not '<', 'v', ...
        _close(cond_plain, cond_ours)
        _close(pred_plain, pred_ours)
        _, _, pred_base = _model_outputs(base, "a photo of a dog")
        gap = (pred_plain - pred_base).abs().max().item()
        assert gap > 1e3 * max((pred_plain - pred_ours).abs().max().item(), 1e-6 * pred_base.abs().max().item())

    for needed in ("a photo of <v1> dog", "a photo of <v2> mug", "c-lora", base_dir, "Not evaluated", "Load **every**"):
        assert needed in card, needed


def test_export_of_an_earlier_state_replaces_the_earlier_export(run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--output", str(out)]) == 0
    assert main(["export", "--run", str(run), "--output", str(out), "--task", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "learned_embeds_v1.safetensors",
                                                     "pytorch_lora_weights.safetensors"]
    lora = load_tensors(out / "pytorch_lora_weights.safetensors")
    expected = load_tensors(task_dir(run, 1) / "pytorch_lora_weights.safetensors")
    assert lora.keys() == expected.keys() and all(torch.equal(lora[k], expected[k]) for k in lora)
    code = _loading_block((out / "README.md").read_text())
    assert "learned_embeds_v1" in code and "learned_embeds_v2" not in code
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no staging folders left


def test_export_includes_the_evaluation(run, tmp_path):
    """Metrics of an evaluated run appear in the card: state 2's column of eval/metrics.json."""
    from dcfast.io.atomic import write_json_atomic
    from dcfast.io.export import export

    metrics = {"summary": {"ammd": 0.25, "final_accuracy": 0.75, "forgetting": None}, "features": "dcfast-randconv-v1",
               "accuracy": [[1.0, 0.5], [None, 0.875]], "mmd": [[0.125, 0.375], [None, 0.0625]], "fidelity": None}
    write_json_atomic(run / "eval" / "metrics.json", metrics)
    try:
        card = (export(run, tmp_path / "export") / "README.md").read_text()
    finally:
        (run / "eval" / "metrics.json").unlink()
    assert "| 1 (`<v1>`) | 0.5 | 0.375 |" in card and "| 2 (`<v2>`) | 0.875 | 0.0625 |" in card
    assert "ammd = 0.25" in card and "final_accuracy = 0.75" in card and "dcfast-randconv-v1" in card


def test_missing_embedding_is_refused_not_split(run, tmp_path, capsys):
    """State 2 without task 1's token embedding: a clear error from export and from load_pipeline."""
    embeds = task_dir(run, 1) / "learned_embeds.safetensors"
    saved = embeds.read_bytes()
    embeds.unlink()
    try:
        assert main(["export", "--run", str(run), "--output", str(tmp_path / "export")]) == 2
        err = capsys.readouterr().err
        assert "task state 2" in err and "needs the modifier-token embeddings of tasks 1..2" in err
        assert "task_1/learned_embeds.safetensors' (<v1>)" in err and "split into pieces" in err
        assert not (tmp_path / "export").exists()
        with pytest.raises(FileNotFoundError, match=r"needs the modifier-token embeddings of tasks 1\.\.2, and 1 are "
                                                    r"missing: .*task_1/learned_embeds.safetensors' \(<v1>\)"):
            load_pipeline(run, 2)
    finally:
        embeds.write_bytes(saved)


def test_export_refuses_bad_requests(run, tmp_path, capsys):
    assert main(["export", "--run", str(run), "--output", str(tmp_path / "a"), "--task", "3"]) == 2
    assert "--task: must be in [1, 2]" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--output", str(tmp_path / "a")]) == 2
    assert "is not a dcfast run" in capsys.readouterr().err
    taken = tmp_path / "mine"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    assert main(["export", "--run", str(run), "--output", str(taken)]) == 2
    assert "exists and is not an earlier dcfast export" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "keep me"


def test_check_tokens_whole_names_a_split_token():
    from dcfast.models.tiny import tiny_tokenizer
    from dcfast.io.runs import check_tokens_whole

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens("<v1>")
    check_tokens_whole(tokenizer, ["<v1>"], "state 1")
    with pytest.raises(ValueError, match=r"state 2: modifier token\(s\) \['<v2>'\] are not in the tokenizer and would "
                                         r"be split"):
        check_tokens_whole(tokenizer, ["<v1>", "<v2>"], "state 2")
