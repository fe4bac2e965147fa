"""`dcfast export`: one folder that a diffusers user loads without dcfast.

    OUT/
      pytorch_lora_weights.safetensors   task state N's LoRA (diffusers format, adapter config in its metadata), or
      adapter_model.safetensors          for a VeRA run, its vectors and shared matrices in peft's layout, and
      adapter_config.json                its peft config (diffusers has no VeRA loader: PeftModel on pipe.unet)
      learned_embeds_v{i}.safetensors    i = 1..N: {"<v_i>": (D,)}, one single-token textual inversion each; for
                                         SDXL {"clip_l": (1, D1), "clip_g": (1, D2)}, the layout of diffusers'
                                         SDXL textual-inversion docs (one load_textual_inversion per encoder)
      export.json                        what was exported: run, state, tokens, prompts, base model
      README.md                          model card: prompts, method, base model, metrics if evaluated, loading code

The folder is built beside OUT under a temporary name, every file written atomically (dcfast.io.atomic), and
then moved onto OUT in one rename; an OUT left by an earlier export is replaced, any other folder is refused.
Everything is safetensors or JSON: nothing pickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from dcfast.io.atomic import write_atomic, write_json_atomic
from dcfast.io.runs import (EMBEDS_FILE, EMBEDS_FILE_2, EVAL_DIR, METRICS_FILE, PEFT_CONFIG_FILE, RUN_FILE,
                            TASK_EVAL_FILE, Run, adapter_files, load_tensors, read_json, save_tensors, task_dir)

PathLike = Union[str, Path]
EXPORT_FILE = "export.json"  # its presence marks a folder this command wrote (and may replace)
CARD_FILE = "README.md"
METHOD_NAMES = {"lora": "sequential LoRA", "ewc": "EWC: online, per-sample Fisher penalty",
                "ewc-dc": "EWC-DC: a diffusion-classifier loss and a DC-Fisher penalty",
                "dsc": "DSC: distillation of diffusion-classifier scores and noise predictions",
                "dsc+ewc-dc": "DSC + EWC-DC", "c-lora": "C-LoRA: a fresh LoRA per task, overlap penalty"}


def embeds_name(index: int) -> str:
    return f"learned_embeds_v{index}.safetensors"


def _tensors_with_metadata(path: Path):
    """An adapter file's tensors and its safetensors metadata (diffusers reads a LoRA's rank and alpha from it)."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return tensors, metadata


def _state(run_dir: Path, task: Optional[int]) -> int:
    """The task state to export: `task`, or the last finished one; every task up to it must be finished."""
    run = Run(run_dir)
    total = len(run.tasks())
    done = set(run.finished_tasks())
    if task is None:
        if not done:
            raise ValueError(f"--run: {str(run_dir)!r} has no finished task yet (no task_i/{METRICS_FILE})")
        task = max(done)
    if not 1 <= task <= total:
        raise ValueError(f"--task: must be in [1, {total}] for run {str(run_dir)!r}, got {task}")
    missing = [i for i in range(1, task + 1) if i not in done]
    if missing:
        raise ValueError(f"--task {task}: tasks {missing} of run {str(run_dir)!r} are not finished (no "
                         f"task_i/{METRICS_FILE}); export a finished state")
    return task


def _metrics(run_dir: Path, n: int) -> Optional[Dict[str, Any]]:
    """Evaluation of state n, if any: column n of eval/metrics.json (dcfast eval), else task_n/eval.json
    (eval_every_task). {"source", "per_concept": [{accuracy, mmd, fidelity?}], "summary"?}."""
    run = Run(run_dir)
    if (run_dir / EVAL_DIR / METRICS_FILE).is_file():
        data = run.evaluation()
        if data.get("accuracy") and len(data["accuracy"][0]) >= n:
            rows = []
            for i in range(n):
                row = {"accuracy": data["accuracy"][i][n - 1], "mmd": data["mmd"][i][n - 1]}
                if data.get("fidelity"):
                    row["fidelity"] = data["fidelity"]["all"][i][n - 1]
                rows.append(row)
            last = len(data["accuracy"][0]) == n
            return {"source": "eval/metrics.json (dcfast eval)", "per_concept": rows, "features": data.get("features"),
                    "summary": {k: v for k, v in data["summary"].items() if v is not None} if last else None}
    if (task_dir(run_dir, n) / TASK_EVAL_FILE).is_file():
        data = run.task_evaluation(n)
        rows = [{"accuracy": a, "mmd": m} for a, m in zip(data["accuracy"], data["mmd"])]
        for row, fid in zip(rows, data.get("fidelity") or []):
            row["fidelity"] = fid.get("all") if isinstance(fid, dict) else fid
        return {"source": f"task_{n}/eval.json (eval_every_task)", "per_concept": rows, "features": None,
                "summary": None}
    return None


def _fmt(value: Any) -> str:
    return "–" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def pipeline_class(xl: bool) -> str:
    return "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"


def loading_code(base: Dict[str, Optional[str]], folder: str, tokens: List[str], vera: bool = False,
                 xl: bool = False) -> str:
    """The code that rebuilds task state N from the exported folder (the model card shows it): diffusers only, or
    with `vera` diffusers and peft, whose PeftModel injects the VeRA adapter into pipe.unet in place (diffusers has
    no VeRA loader, and peft's inject_adapter_in_model refuses VeRA, whose matrices are shared by its layers).
    SDXL (`xl`): StableDiffusionXLPipeline, and each token loaded into both text encoders."""
    extra = "".join(f", {k}={base[k]!r}" for k in ("revision", "variant") if base.get(k))
    lines = [f"from diffusers import {pipeline_class(xl)}"] + (["from peft import PeftModel"] if vera else [])
    lines += ["from safetensors.torch import load_file"] if xl else []
    lines += ["",
              f"folder = {folder!r}",
              f"pipe = {pipeline_class(xl)}.from_pretrained({base['name_or_path']!r}{extra})",
              "pipe.unet = PeftModel.from_pretrained(pipe.unet, folder).get_base_model()  # VeRA, through peft" if vera
              else 'pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")']
    for i, token in enumerate(tokens, start=1):
        if xl:
            lines += [f'state = load_file(f"{{folder}}/{embeds_name(i)}")  # {token}',
                      f'pipe.load_textual_inversion(state["clip_l"], token={token!r}, text_encoder=pipe.text_encoder, '
                      f'tokenizer=pipe.tokenizer)',
                      f'pipe.load_textual_inversion(state["clip_g"], token={token!r}, text_encoder=pipe.text_encoder_2, '
                      f'tokenizer=pipe.tokenizer_2)']
        else:
            lines.append(f'pipe.load_textual_inversion(f"{{folder}}/{embeds_name(i)}")  # {token}')
    return "\n".join(lines) + "\n"


def _card(run_dir: Path, n: int, total: int, config: Dict[str, Any], tasks, base: Dict[str, Optional[str]],
          base_for_code: str, folder: str, metrics: Optional[Dict[str, Any]], vera: bool, xl: bool) -> str:
    tokens = [t.token for t in tasks[:n]]
    method = config["method"]
    code_base = dict(base, name_or_path=base_for_code)
    lines = ["---",
             f"base_model: {json.dumps(base['name_or_path'])}",
             "library_name: diffusers",
             f"tags: [text-to-image, {'stable-diffusion-xl' if xl else 'stable-diffusion'}, "
             f"{'vera, peft' if vera else 'lora'}, textual-inversion, "
             "continual-learning, dcfast]",
             f"instance_prompt: {json.dumps(tasks[n - 1].prompt)}",
             "---", "",
             f"# Task state {n} of {total}: {n} personal concept(s), learned one after another", "",
             f"Exported by `dcfast export` from the run `{run_dir}`. Continual personalization with "
             f"**{method}** ({METHOD_NAMES.get(method, method)}): each task taught the model one concept with its "
             f"own modifier token; this is the model after task {n}, which should still draw every earlier concept.",
             "", "## Concepts and prompts", "", "| task | token | class word | prompt | file |", "|---|---|---|---|---|"]
    lines += [f"| {t.index} | `{t.token}` | {t.class_word} | `{t.prompt}` | `{embeds_name(t.index)}` |" for t in tasks[:n]]
    revision = f", revision `{base['revision']}`" if base.get("revision") else ""
    variant = f", variant `{base['variant']}`" if base.get("variant") else ""
    adapter = ("VeRA r {rank} (frozen random matrices shared by every layer, trained vectors)"
               if config.get("adapter") == "vera" else "LoRA rank {rank} (alpha {alpha})").format(
        rank=config["rank"], alpha=config.get("lora_alpha") or config["rank"])
    weights = (f"`adapter_model.safetensors` and `adapter_config.json`: the U-Net VeRA of state {n} in peft's layout "
               f"(its shared random matrices included). diffusers has no VeRA loader for pipelines "
               f"(`load_lora_weights` reads LoRA only): peft's `PeftModel` loads it into `pipe.unet`, as below"
               if vera else f"`pytorch_lora_weights.safetensors`: the U-Net LoRA of state {n} (diffusers format)"
               + ("; C-LoRA's summed VeRA updates, exactly, as one stacked LoRA" if config.get("adapter") == "vera"
                  else ""))
    lines += ["", "## Method and base model", "",
              f"- base model: `{base['name_or_path']}`{revision}{variant}",
              f"- method: `{method}`; {adapter} "
              f"on {', '.join(f'`{m}`' for m in config['target_modules'])}; {config['max_train_steps']} steps per task, "
              f"learning rate {config['learning_rate']} (token {config['token_learning_rate']}), seed {config['seed']}",
              f"- {weights}; the text encoder{'s are' if xl else ' is'} unchanged except for the {n} token "
              f"embedding(s)", ""]
    if xl:
        lines[-1:-1] = [f"- an SDXL state: load it into `StableDiffusionXLPipeline` (an SD 1.x/2.x pipeline cannot: "
                        f"its U-Net and text encoder differ); each token file holds the token's embedding in both "
                        f"text encoders (`clip_l`, `clip_g`)"]
    lines += ["## Metrics", ""]
    if metrics is None:
        lines += [f"Not evaluated. `dcfast eval --run {run_dir}` measures accuracy, MMD and (tiny-world runs) "
                  f"fidelity of every concept at every state; export again afterwards to include them.", ""]
    else:
        has_fidelity = any("fidelity" in r for r in metrics["per_concept"])
        head = "| concept | DC accuracy | MMD² |" + (" fidelity |" if has_fidelity else "")
        lines += [f"At state {n}, from {metrics['source']}"
                  + (f", MMD features `{metrics['features']}`" if metrics.get("features") else "") + ":", "",
                  head, "|---|---|---|" + ("---|" if has_fidelity else "")]
        for i, row in enumerate(metrics["per_concept"], start=1):
            lines.append(f"| {i} (`{tasks[i - 1].token}`) | {_fmt(row['accuracy'])} | {_fmt(row['mmd'])} |"
                         + (f" {_fmt(row.get('fidelity'))} |" if has_fidelity else ""))
        if metrics.get("summary"):
            lines += ["", "Run summary: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(metrics["summary"].items())
                                                      if isinstance(v, (int, float)))]
        lines.append("")
    code = loading_code(code_base, folder, tokens, vera, xl)
    prompts = [t.prompt for t in tasks[:n]]
    lines += [f"## Loading with diffusers{' and peft' if vera else ''} (no dcfast needed)", "", "```python",
              code.rstrip("\n"), "```", "",
              "Then every concept's prompt works on this one pipeline:", "",
              "```python", f"images = [pipe(prompt).images[0] for prompt in {prompts!r}]", "```", "",
              f"Load **every** `learned_embeds_v*.safetensors` (tasks 1..{n}): a prompt naming a token whose file "
              f"was not loaded is split by the tokenizer into pieces (`<`, `v`, …) and silently loses its concept.", ""]
    return "\n".join(lines)


def export(run_dir: PathLike, output: PathLike, task: Optional[int] = None) -> Path:
    """Write task state `task` (default: the last finished) of `run_dir` into the folder `output`; returns it."""
    run_dir, output = Path(run_dir), Path(output)
    if not (run_dir / RUN_FILE).is_file():
        raise ValueError(f"--run: {str(run_dir)!r} is not a dcfast run (no {RUN_FILE})")
    n = _state(run_dir, task)
    if output.exists() and not (output / EXPORT_FILE).is_file() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output: {str(output)!r} exists and is not an earlier dcfast export; choose a new or "
                         f"empty folder (nothing was written)")
    run = Run(run_dir)
    tasks = run.tasks()
    embeds = run.embeddings(n)  # every token 1..n, or a clear error
    xl = (task_dir(run_dir, 1) / EMBEDS_FILE_2).is_file()  # an SDXL run writes the second encoder's tokens
    embeds_2 = run.embeddings(n, 1) if xl else {}
    files = adapter_files(task_dir(run_dir, n))
    vera = PEFT_CONFIG_FILE in files
    weights, metadata = _tensors_with_metadata(task_dir(run_dir, n) / files[0])
    peft_config = read_json(task_dir(run_dir, n) / PEFT_CONFIG_FILE) if vera else None
    config = run.config()
    base = run.base_model()
    local = Path(base["name_or_path"]).expanduser()
    base_for_code = str(local.resolve()) if local.is_dir() else base["name_or_path"]
    folder = str(output.resolve())

    staging = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_tensors(staging / files[0], weights, metadata=metadata)
        if vera:
            write_json_atomic(staging / PEFT_CONFIG_FILE, peft_config)
        for t in tasks[:n]:
            save_tensors(staging / embeds_name(t.index),
                         {"clip_l": embeds[t.token].float()[None], "clip_g": embeds_2[t.token].float()[None]} if xl
                         else {t.token: embeds[t.token].float()})
        write_json_atomic(staging / EXPORT_FILE, {
            "run": str(run_dir.resolve()), "task_state": n, "method": config["method"], "base_model": base,
            "tokens": {embeds_name(t.index): t.token for t in tasks[:n]}, "prompts": [t.prompt for t in tasks[:n]],
            "adapter": "vera" if vera else "lora", "adapter_files": files, "pipeline": pipeline_class(xl),
            "source_files": [str(task_dir(run_dir, n) / f) for f in files]
            + [str(task_dir(run_dir, t.index) / name) for t in tasks[:n]
               for name in ((EMBEDS_FILE, EMBEDS_FILE_2) if xl else (EMBEDS_FILE,))]})
        card = _card(run_dir, n, len(tasks), config, tasks, base, base_for_code, folder, _metrics(run_dir, n), vera,
                     xl)
        write_atomic(staging / CARD_FILE, lambda temp: Path(temp).write_text(card))
        old = output.parent / f".{output.name}.replaced-{os.getpid()}"
        if output.exists():
            os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
