"""The README keeps its promises, and the docs keep their links.

- Every ```python block of README.md runs here as written (the training example against a tiny model laid
  out in a Hugging Face cache under the README's own Hub id), or is listed in NOT_RUN with the reason.
- Every `dcfast ...` command line in a ```bash block of README.md and docs/*.md parses with the real
  parser (nothing runs), and every --flag it uses is an option of its subcommand, spelled out in full.
- The README stays at most MAX_LINES lines.
- Every relative link of README.md, CHANGELOG.md and docs/*.md points at a file that exists (and, for
  a link to a heading, at a heading that exists), and every `dcfast.x.y` name they mention imports.
"""
import argparse
import ast
import dataclasses
import importlib
import re
import shlex
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_LINES = 250  # the bound: a newcomer reads it in ten minutes; everything else lives in docs/

RUN = ("DC scores", "Per-sample Fisher", "Train on your own Stable Diffusion model")
NOT_RUN = {
    "Export for diffusers": "loads a base model from the placeholder 'path/to/base' and an exported folder; "
                            "test_readme_export_loading_code_is_what_export_writes keeps it equal to "
                            "dcfast.io.export.loading_code, which python_tests/training/test_export.py runs against "
                            "load_pipeline's U-Net output",
}
TRAIN_SECTION = "Train on your own Stable Diffusion model"


def _section(section: str, path: Path = README) -> str:
    text = path.read_text()
    assert f"## {section}\n" in text, f"{path.name} has no section '## {section}'"
    return text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]


def _python_block(section: str) -> str:
    return re.search(r"```python\n(.*?)```", _section(section), re.S).group(1)


def _fenced(text: str, language: str):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _sections_with(language: str, path: Path = README):
    """Names of the `## ` sections of `path` holding a ```language block, in order."""
    names = []
    for chunk in ("\n" + path.read_text()).split("\n## ")[1:]:
        if _fenced(chunk, language):
            names.append(chunk.split("\n", 1)[0])
    return names


# --- Python blocks ------------------------------------------------------------------------------------------

def test_every_readme_python_block_runs_or_says_why_not():
    sections = _sections_with("python")
    unaccounted = [s for s in sections if s not in RUN and s not in NOT_RUN]
    assert not unaccounted, (f"README sections {unaccounted} have Python blocks that no test runs: run them in "
                             f"this file, or list them in NOT_RUN with the reason they cannot run")
    stale = [s for s in (*RUN, *NOT_RUN) if s not in sections]
    assert not stale, f"sections {stale} are listed here but have no Python block in the README"
    for section in sections:
        assert len(_fenced(_section(section), "python")) == 1, f"'{section}' holds several Python blocks"


@pytest.mark.parametrize("section", ["DC scores", "Per-sample Fisher"])
def test_readme_example_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_python_block(section), f"README:{section}", "exec"), namespace)
    if section == "DC scores":
        assert namespace["err"].shape == (4, 8, 8) and namespace["logits"].shape == (4, 8)
    else:
        assert set(namespace["acc"].fisher) and (tmp_path / "fisher.safetensors").is_file()
        assert namespace["penalty"].item() == 0.0  # theta equals its anchor


def test_readme_export_loading_code_is_what_export_writes():
    """The README's diffusers loading code for an export is the code `dcfast export` puts in its model card."""
    from dcfast.io.export import loading_code

    block = _python_block("Export for diffusers")
    written = loading_code({"name_or_path": "path/to/base"}, "my-concepts", ["<v1>", "<v2>"])
    readme_lines = [line.split("   #")[0].rstrip() for line in block.strip().splitlines()]
    code_lines = [line.replace("'", '"') for line in written.strip().splitlines()]
    assert readme_lines == code_lines


def _train_help() -> str:
    from dcfast.cli.main import build_parser

    return _subparser(build_parser(), "train").format_help()


def _known_config_name(name: str, help_text: str) -> bool:
    """A TrainConfig field, or a flag `dcfast train --help` lists (method settings may live in their own classes)."""
    from dcfast.training.config import TrainConfig

    return name in {f.name for f in dataclasses.fields(TrainConfig)} or re.search(rf"--{re.escape(name)}\b", help_text)


def test_readme_training_example_names_only_real_settings():
    tree = ast.parse(_python_block(TRAIN_SECTION))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "TrainConfig"]
    assert calls, "the training example builds no TrainConfig"
    import yaml

    (yaml_block,) = _fenced(_section(TRAIN_SECTION), "yaml")
    names = [k.arg for call in calls for k in call.keywords] + list(yaml.safe_load(yaml_block))
    help_text = _train_help()
    unknown = [n for n in names if not _known_config_name(n, help_text)]
    assert not unknown, f"the README's training example names settings that do not exist: {unknown}"


@pytest.fixture
def readme_model_and_photos(tmp_path, monkeypatch):
    """The README's Hub id as a snapshot of the tiny model in a Hugging Face cache of this test's own, its
    photo folders as tiny generated images, the working directory beside them, and no network at all."""
    from dcfast.io.images import write_shape_images
    from dcfast.models.tiny import tiny

    block = _python_block(TRAIN_SECTION)
    model_id = re.search(r'pretrained_model_name_or_path="([^"]+)"', block).group(1)
    commit = "0" * 40
    repo = tmp_path / "hf-cache" / f"models--{model_id.replace('/', '--')}"
    tiny(seed=0).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    folders = sorted(set(re.findall(r'"(?:eval_)?images": "([^"]+)"', block)))
    assert folders, "the training example names no image folders"
    for i, folder in enumerate(folders):
        write_shape_images(folder, (40 + 50 * i, 200 - 40 * i, 60 + 30 * i))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return model_id


def test_readme_training_example_runs(readme_model_and_photos, monkeypatch):
    """The example as written, on the tiny model cached under the README's Hub id; only the steps per task
    are cut to 2 (the README's own count is a real model's)."""
    import dcfast
    import dcfast.training.trainer as trainer

    real_train, seen = trainer.train, []

    def short_train(config, *args, **kwargs):
        seen.append(config)
        return real_train(dataclasses.replace(config, max_train_steps=2), *args, **kwargs)

    monkeypatch.setattr(trainer, "train", short_train)
    monkeypatch.delitem(vars(dcfast), "train", raising=False)  # `dcfast.train` resolves lazily again: to short_train
    namespace = {}
    try:
        exec(compile(_python_block(TRAIN_SECTION), f"README:{TRAIN_SECTION}", "exec"), namespace)
    finally:
        vars(dcfast).pop("train", None)  # the lazy lookup cached short_train; monkeypatch then restores the original
    assert seen and seen[0].pretrained_model_name_or_path == readme_model_and_photos
    result = namespace["result"]
    assert len(result.task_dirs) == len(seen[0].tasks) == 2
    for folder in result.task_dirs:
        assert (Path(folder) / "pytorch_lora_weights.safetensors").is_file()


def test_readme_training_yaml_is_a_valid_config(readme_model_and_photos, tmp_path):
    """The README's run.yaml loads (flat method settings included) and passes every check made before training."""
    from dcfast.training.config import TrainConfig

    (yaml_block,) = _fenced(_section(TRAIN_SECTION), "yaml")
    path = tmp_path / "run.yaml"
    path.write_text(yaml_block)
    config = TrainConfig.from_yaml(path)
    config.validate()
    assert config.pretrained_model_name_or_path == readme_model_and_photos


def test_docs_python_blocks_compile():
    for path in DOCS:
        for i, block in enumerate(_fenced(path.read_text(), "python")):
            compile(block, f"{path.name}:python block {i + 1}", "exec")


# --- Command lines ----------------------------------------------------------------------------------------

def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def _dcfast_commands(text: str):
    """argv lists (after `dcfast`) of every dcfast command in the ```bash blocks of `text`: `dcfast ...`, and
    `... -m dcfast.cli[.main] ...` (accelerate launch, torchrun), split at && | ;."""
    found = []
    for block in _fenced(text, "bash"):
        for line in block.splitlines():
            tokens = shlex.split(line, comments=True)
            segment = []
            for token in tokens + ["&&"]:
                if token not in ("&&", "||", "|", ";"):
                    segment.append(token)
                    continue
                while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", segment[0]):  # VAR=value prefixes
                    segment.pop(0)
                if segment[:1] == ["dcfast"]:
                    found.append((line, segment[1:]))
                elif "-m" in segment and segment.index("-m") + 1 < len(segment) and \
                        segment[segment.index("-m") + 1] in ("dcfast.cli", "dcfast.cli.main"):
                    found.append((line, segment[segment.index("-m") + 2:]))
                segment = []
    return found


def _commands(paths):
    return [(path.name, line, argv) for path in paths for line, argv in _dcfast_commands(path.read_text())]


def test_readme_shows_each_main_command():
    subcommands = {argv[0] for _, _, argv in _commands([README]) if argv}
    assert {"demo", "train", "eval", "export"} <= subcommands, subcommands


@pytest.mark.parametrize("where,line,argv", [pytest.param(*c, id=f"{c[0]}: dcfast {' '.join(c[2])}")
                                              for c in _commands([README, *DOCS])])
def test_command_line_parses(where, line, argv):
    from dcfast.cli.main import build_parser

    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `{line.strip()}` does not parse (exit {exit_.code})")
    options = set(_subparser(parser, argv[0])._option_string_actions)
    unknown = [t.split("=", 1)[0] for t in argv[1:] if t.startswith("--") and t.split("=", 1)[0] not in options]
    assert not unknown, f"{where}: `{line.strip()}` uses {unknown}, which `dcfast {argv[0]}` does not define " \
                        f"(argparse would take an abbreviation; write the flag in full)"


# --- Length, links, names ---------------------------------------------------------------------------------

def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines, more than {MAX_LINES}: move details to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


LINKED = [README, ROOT / "CHANGELOG.md", *DOCS]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert path.is_file(), f"{path} is missing"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no {linked.relative_to(ROOT) if ROOT in linked.parents else linked})")
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", _without_code(linked.read_text()), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{target} (no heading '#{anchor}' in {linked.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attribute in parts[i:]:
                value = getattr(value, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_dotted_names_import(path):
    """`dcfast.io.runs.load_pipeline`, `dcfast.engine.chunks.chunk_tuner`, ...: each name the text mentions exists."""
    names = sorted(set(re.findall(r"(?<![\w/.-])dcfast(?:\.[A-Za-z_]\w*)+", path.read_text())))
    missing = [n for n in names if not _resolves(n)]
    assert not missing, f"{path.name} names what does not exist (moved or renamed?): {missing}"
