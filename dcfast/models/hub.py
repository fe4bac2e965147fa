"""Model sources: a local diffusers directory, or a Hugging Face Hub id already in the local cache.

Nothing is ever downloaded: a Hub id is looked up with `local_files_only=True` in the cache that
`hf download` fills (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`):

    models--{org}--{name}/refs/{branch}            the commit a branch or tag points at
    models--{org}--{name}/snapshots/{commit}/...   the files of that commit (links into blobs/)

No torch import here: config validation resolves the model before anything loads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

FIELD = "pretrained_model_name_or_path"
# A Hub repo id: "name" or "org/name"; letters, digits, '-', '_', '.' (no leading dot, no '..').
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def hub_cache_dir() -> Path:
    """The Hub cache, read from the environment at call time (tests and users may set it after import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def is_repo_id(text: str) -> bool:
    """True when `text` has the shape of a Hub id ("org/name" or "name"), not of a file-system path."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def download_hint(repo_id: str, revision: Optional[str] = None) -> str:
    """The command that puts `repo_id` into the local cache (huggingface_hub's CLI)."""
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def resolve_model(name_or_path: Union[str, Path], revision: Optional[str] = None, field: str = FIELD) -> Path:
    """The local directory of a model: `name_or_path` itself when it is a directory, else the cached Hub snapshot.

    `revision` (branch, tag or commit hash) selects the snapshot of a Hub id; for a local directory it must be
    unset. ValueError naming `field` when the model is neither a directory nor cached, saying how to download it.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision:
            raise ValueError(f"revision: {revision!r} applies to Hub ids only, but {field} {text!r} is a local "
                             f"directory; remove revision (the directory's files are what is loaded)")
        return path
    if not is_repo_id(text):
        raise ValueError(f"{field}: {text!r} is not a directory; point it at a local diffusers model directory "
                         f"(with unet/, text_encoder/, tokenizer/, scheduler/) or give a Hub id such as "
                         f"'org/name' that is in the local Hugging Face cache; nothing is downloaded")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"{field}: {text!r} is not a local directory, and the Hub model {text!r}{at} is not in the "
                         f"local Hugging Face cache ({str(cache)!r}, set by HF_HUB_CACHE or HF_HOME); dcfast never "
                         f"downloads. Download it into that cache first: `{download_hint(text, revision)}` "
                         f"(huggingface_hub < 1.0: `huggingface-cli{download_hint(text, revision)[2:]}`), or point "
                         f"{field} at a local diffusers directory") from None


def check_variant(model_dir: Union[str, Path], variant: Optional[str],
                  subfolders=("unet", "text_encoder", "text_encoder_2", "vae"), repo_id: Optional[str] = None) -> None:
    """ValueError naming `variant` when a weighted subfolder has no `*.{variant}.safetensors|bin` file.

    diffusers and transformers load `diffusion_pytorch_model.fp16.safetensors` / `model.fp16.safetensors` for
    variant "fp16" (sharded: `*.{variant}-00001-of-0000N.safetensors`, index `*.index.{variant}.json`).
    """
    if not variant:
        return
    root = Path(model_dir)
    for name in subfolders:
        folder = root / name
        if not folder.is_dir():
            continue  # a missing required subfolder is check_model_dir's message; vae/ is optional
        files = sorted(p.name for p in folder.iterdir())
        if not any(f".{variant}." in f or f".{variant}-" in f for f in files if f.endswith(WEIGHT_SUFFIXES + (".json",))):
            fix = (f"; or download them: `hf download {repo_id} --include '*{variant}*'`" if repo_id else "")
            raise ValueError(f"variant: {variant!r} weights are missing in {name}/ of {str(root)!r} (files: "
                             f"{', '.join(files) or 'none'}); remove variant to load the default weights{fix}")
