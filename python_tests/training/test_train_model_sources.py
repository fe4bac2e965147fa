"""Model sources: a Hub id read from a local Hugging Face cache that the test lays out itself (nothing downloaded).

The cache is huggingface_hub's layout: models--{org}--{name}/blobs/<hash>, snapshots/<commit>/... (links into
blobs/) and refs/<branch> holding the commit. The models are the tiny pipeline built in code.
"""
import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from dcfast.models.loading import load_components
from dcfast.models.tiny import tiny

REPO = "dcfast-test/tiny-sd"
MAIN, DEV = "a" * 40, "b" * 40  # commit hashes of two snapshots: main = seed 0, dev = seed 1 (+ fp16 variant files)


def _cache_snapshot(cache: Path, repo_id: str, source: Path, commit: str, refs=()) -> Path:
    """Files of `source` as the snapshot `commit` of `repo_id`: blobs by content hash, relative links to them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, model_dir):
    """A cache holding REPO at main (the tiny model, seed 0) and dev (seed 1, default and fp16-variant files)."""
    root = tmp_path_factory.mktemp("hf_cache")
    _cache_snapshot(root, REPO, Path(model_dir), MAIN, refs=("main",))
    dev = tmp_path_factory.mktemp("dev_model")
    tiny(seed=1).save_pretrained(dev)
    tiny(seed=2).save_pretrained(dev, variant="fp16")
    _cache_snapshot(root, REPO, dev, DEV, refs=("dev",))
    return root


@pytest.fixture
def offline(monkeypatch, hub_cache):
    """HF_HUB_CACHE at the test's cache, and any network connection an error: nothing may be downloaded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return hub_cache


def _unet_weight(components):
    return components.unet.conv_in.weight.detach()


def test_cached_hub_id_loads_the_main_snapshot(offline, model_dir):
    from_cache, from_dir = load_components(REPO), load_components(model_dir)
    for a, b in ((from_cache.unet, from_dir.unet), (from_cache.text_encoder, from_dir.text_encoder),
                 (from_cache.vae, from_dir.vae)):
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert from_cache.tokenizer.tokenize("a photo of a dog") == from_dir.tokenizer.tokenize("a photo of a dog")


@pytest.mark.parametrize("revision", ["dev", DEV])
def test_revision_picks_the_branch_or_commit(offline, revision):
    expected = tiny(seed=1).unet.conv_in.weight.detach()
    main, dev = load_components(REPO), load_components(REPO, revision=revision)
    assert torch.equal(_unet_weight(dev), expected)
    assert not torch.equal(_unet_weight(main), expected)


def test_variant_loads_the_variant_files(offline):
    components = load_components(REPO, revision="dev", variant="fp16")
    assert torch.equal(_unet_weight(components), tiny(seed=2).unet.conv_in.weight.detach())
    seed2_text = tiny(seed=2).text_encoder.state_dict()
    assert all(torch.equal(v, seed2_text[k]) for k, v in components.text_encoder.state_dict().items())


def test_train_and_reload_from_a_cached_hub_id(offline, make_config, tmp_path):
    """A run on a Hub id: validated, trained, and its task state rebuilt by load_pipeline from the same cache."""
    from dcfast.io.runs import load_pipeline
    from dcfast.training.trainer import train

    config = make_config("lora", words=("dog",), max_train_steps=1, pretrained_model_name_or_path=REPO,
                         revision="dev", variant="fp16")
    config.validate()
    train(config)
    pipe = load_pipeline(config.output_dir, 1)
    assert torch.equal(pipe.unet.conv_in.weight.detach(), tiny(seed=2).unet.conv_in.weight.detach())
    assert pipe.tokenizer.tokenize("a photo of <v1> dog") == ["a</w>", "photo</w>", "of</w>", "<v1>", "dog</w>"]


def test_uncached_hub_id_says_so_and_how_to_download(offline, make_config):
    with pytest.raises(ValueError) as info:
        make_config(pretrained_model_name_or_path="someone/not-cached").validate()
    message = str(info.value)
    assert "pretrained_model_name_or_path: 'someone/not-cached' is not a local directory" in message
    assert "not in the local Hugging Face cache" in message and str(offline) in message
    assert "`hf download someone/not-cached`" in message and "never downloads" in message


def test_uncached_revision_is_named(offline, make_config):
    with pytest.raises(ValueError, match=r"'dcfast-test/tiny-sd' at revision 'v9' is not in the local Hugging Face "
                                         r"cache.*`hf download dcfast-test/tiny-sd --revision v9`"):
        make_config(pretrained_model_name_or_path=REPO, revision="v9").validate()


def test_missing_variant_is_named_before_loading(offline, make_config):
    with pytest.raises(ValueError) as info:
        make_config(pretrained_model_name_or_path=REPO, variant="bf16").validate()
    message = str(info.value)
    assert "variant: 'bf16' weights are missing in unet/" in message
    assert "diffusion_pytorch_model.safetensors" in message and f"hf download {REPO} --include '*bf16*'" in message


def test_revision_with_a_local_directory_is_refused(make_config):
    with pytest.raises(ValueError, match=r"revision: 'dev' applies to Hub ids only"):
        make_config(revision="dev").validate()


def test_incomplete_snapshot_names_the_missing_folder(offline, make_config, model_dir, tmp_path):
    """A snapshot downloaded only in part (no unet/) is named as such, not loaded half."""
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    shutil.rmtree(partial / "unet")
    _cache_snapshot(offline, "dcfast-test/partial", partial, MAIN, refs=("main",))
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path: model directory .*snapshots.* has no unet/"):
        make_config(pretrained_model_name_or_path="dcfast-test/partial").validate()
