"""Evaluation reports: metrics.json, report.md, heatmaps, image grids, and comparisons across runs.

`write_report(result)` writes into `<run_dir>/eval/`:

    metrics.json            matrices (rows = concepts i, columns = task states j, null = unseen) and summary
    report.md               the same as tables, with the feature extractor named
    accuracy.png, mmd.png   heatmaps (i2i.png with CLIP features; fidelity.png on world runs)
    grid_concept_{i}.png    real images, then the samples of concept i under every state j >= i

`compare(run_dirs, out_dir)` reads each run's eval/metrics.json and writes compare.md, compare.json
and compare.png (AMMD, BwT-MMD, final accuracy and time per method). Every file is written
atomically (`dcfast.io.atomic.write_atomic`: temp file, fsync, os.replace).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the non-interactive backend)
import numpy as np  # noqa: E402

from dcfast.io.atomic import write_atomic  # noqa: E402
from dcfast.io.runs import EVAL_DIR  # noqa: E402



def _write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return str(write_atomic(path, write))


def _save_figure(fig, path: str) -> str:
    try:
        return str(write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")))
    finally:
        plt.close(fig)


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def _matrix_table(matrix: Optional[List[List[Optional[float]]]], digits: int = 4) -> str:
    n = len(matrix)
    lines = ["| concept \\ state | " + " | ".join(f"j={j}" for j in range(1, n + 1)) + " |",
             "|---|" + "---|" * n]
    for i, row in enumerate(matrix, 1):
        lines.append(f"| i={i} | " + " | ".join(_fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def _heatmap(matrix: List[List[Optional[float]]], title: str, path: str, cmap: str) -> str:
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = values.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1.5))
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap)
    for i in range(n):
        for j in range(n):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8, color="black",
                        bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1})
    ax.set_xticks(range(n), [str(j) for j in range(1, n + 1)])
    ax.set_yticks(range(n), [str(i) for i in range(1, n + 1)])
    ax.set_xlabel("task state j (model after task j)")
    ax.set_ylabel("concept i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save_figure(fig, path)


def _grid(result, i: int, path: str) -> str:
    """Row 0: real images of concept i; row r: samples of concept i under state j = i + r - 1."""
    states = [j for j in range(i, len(result.tasks) + 1) if (i, j) in result.samples]
    rows = [("real", result.real_samples.get(i))] + [(f"state {j}", result.samples[(i, j)]) for j in states]
    cols = max(r[1].shape[0] for r in rows if r[1] is not None)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.3 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if images is not None and c < images.shape[0]:
                ax.imshow(images[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"concept {i}: {result.tasks[i - 1]['prompt']}", fontsize=9)
    return _save_figure(fig, path)


def _markdown(data: dict, images: Dict[str, str]) -> str:
    s = data["summary"]
    lines = [f"# Evaluation of `{data['run_dir']}`", "",
             f"- method: **{data['method']}**",
             f"- features: **{data['features']}**",
             f"- generated images per (concept, state): {data['config']['num_images']} "
             f"(DDIM, {data['config']['num_inference_steps']} steps, guidance {data['config']['guidance_scale']})",
             f"- DC classification schedule (pairs, keep): {data['config']['stages']}", ""]
    train_split = [t["index"] for t in data["tasks"] if t["eval_split"] == "train"]
    if train_split:
        lines += [f"**Note:** concepts {train_split} have no held-out folder; their accuracy and MMD use "
                  f"training images.", ""]
    lines += ["## Summary", "", "| AMMD | BwT-MMD (+ = forgetting) | final accuracy | forgetting | "
              "final I2I | DC s/image | train s | eval s |", "|---|---|---|---|---|---|---|---|",
              "| " + " | ".join(_fmt(s.get(k)) for k in ("ammd", "bwt_mmd", "final_accuracy", "forgetting", "final_i2i",
                                                       "seconds_per_image", "train_seconds", "eval_seconds")) + " |", "",
              "## Tasks", "", "| i | prompt | eval images | ‖ΔLoRA‖ (task i moved the LoRA factors) | ‖Δtoken‖ |",
              "|---|---|---|---|---|"]
    lines += [f"| {t['index']} | `{t['prompt']}` | {t['eval_split']} | {_fmt(t.get('lora_change'))} | "
              f"{_fmt(t.get('token_change'))} |" for t in data["tasks"]]
    sections = [("Accuracy A[i, j] (DC classification of held-out images)", "accuracy"),
                (f"MMD² M[i, j] ({data['features']})", "mmd"),
                ("CLIP I2I[i, j]", "i2i"),
                ("DC classification seconds per image", "seconds_per_image")]
    for title, key in sections:
        if data.get(key) is not None:
            lines += ["", f"## {title}", "", _matrix_table(data[key])]
    if data.get("fidelity") is not None:
        lines += ["", "## Concept fidelity (tiny world, judged by the oracle)", "",
                  "| final fidelity | plasticity (mean F[i, i]) | BwT-fidelity (− = forgetting) | forgetting (first N−1) | "
                  "final shape-only | final colour-only |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(_fmt(s.get(k)) for k in ("final_fidelity", "plasticity", "bwt_fidelity",
                                                           "fidelity_forgetting", "final_shape_fidelity",
                                                           "final_colour_fidelity")) + " |"]
        for name, matrix in data["fidelity"].items():
            label = "every defining attribute (shape and colour)" if name == "all" else f"{name} only"
            lines += ["", f"### F[i, j]: {label}", "", _matrix_table(matrix, digits=3)]
        if data.get("overwrite") is not None:
            lines += ["", "### O[i, j]: concept i's prompt drawing concept j, the newest (i < j; final mean "
                      f"{_fmt(s.get('final_overwrite'))})", "", _matrix_table(data["overwrite"], digits=3)]
        if data.get("base_fidelity") is not None:
            lines += ["", "### B[j]: the base model's own prompts drawn as they say, per task state", "",
                      "| " + " | ".join(f"state {j}" for j in range(1, len(data["base_fidelity"]) + 1)) + " |",
                      "|" + "---|" * len(data["base_fidelity"]),
                      "| " + " | ".join(_fmt(v) for v in data["base_fidelity"]) + " |"]
    lines += ["", "## Figures", ""] + [f"![{name}]({os.path.basename(path)})" for name, path in images.items()]
    return "\n".join(lines) + "\n"


def write_report(result, out_dir: Optional[str] = None) -> Dict[str, str]:
    """Write metrics.json, report.md, heatmaps and grids of an `EvalResult`; returns {name: path}."""
    out_dir = out_dir or os.path.join(result.run_dir, EVAL_DIR)
    data = result.to_dict()
    paths = {"metrics": os.path.join(out_dir, "metrics.json")}
    images = {}
    if data["accuracy"] is not None:
        images["accuracy"] = _heatmap(data["accuracy"], "DC accuracy A[i, j]", os.path.join(out_dir, "accuracy.png"),
                                      "viridis")
        images["mmd"] = _heatmap(data["mmd"], f"MMD² M[i, j]\n{data['features']}", os.path.join(out_dir, "mmd.png"),
                                 "magma_r")
    if data["i2i"] is not None:
        images["i2i"] = _heatmap(data["i2i"], "CLIP I2I", os.path.join(out_dir, "i2i.png"), "viridis")
    if data.get("fidelity") is not None:
        images["fidelity"] = _heatmap(data["fidelity"]["all"], "concept fidelity F[i, j] (oracle: shape and colour)",
                                      os.path.join(out_dir, "fidelity.png"), "viridis")
    for task in result.tasks:
        i = task["index"]
        images[f"grid_concept_{i}"] = _grid(result, i, os.path.join(out_dir, f"grid_concept_{i}.png"))
    _write_text(paths["metrics"], json.dumps(data, indent=2, allow_nan=False))
    paths["report"] = _write_text(os.path.join(out_dir, "report.md"), _markdown(data, images))
    paths.update(images)
    return paths


def load_metrics(run_dir: str) -> dict:
    """A run's eval/metrics.json; raises naming the file when it is missing or corrupt."""
    path = os.path.join(run_dir, EVAL_DIR, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: evaluate the run first (`dcfast eval --run {run_dir}`)")
    try:
        with open(path) as f:
            data = json.load(f)
        data["summary"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt ({e}); re-run `dcfast eval --run {run_dir}`") from e
    return data


COMPARE_COLUMNS = (("final_fidelity", "final fidelity"), ("fidelity_forgetting", "fidelity forgetting"),
                   ("ammd", "AMMD"), ("bwt_mmd", "BwT-MMD"), ("final_accuracy", "final accuracy"),
                   ("forgetting", "forgetting"), ("train_seconds", "train s"), ("seconds_per_image", "DC s/image"))


def compare(run_dirs: Sequence[str], out_dir: str) -> Dict[str, str]:
    """One table (compare.md, compare.json) and one plot (compare.png) of evaluated runs."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    rows = []
    for run_dir in run_dirs:
        data = load_metrics(run_dir)
        rows.append({"run_dir": run_dir, "method": data["method"], "features": data["features"],
                     **{k: data["summary"].get(k) for k, _ in COMPARE_COLUMNS}})
    features = sorted({r["features"] for r in rows})
    lines = ["# Comparison of runs", ""]
    if len(features) > 1:
        lines += [f"**Warning:** runs use different feature extractors ({features}); their MMDs are not comparable.", ""]
    else:
        lines += [f"features: **{features[0]}**", ""]
    lines += ["| method | run | " + " | ".join(label for _, label in COMPARE_COLUMNS) + " |",
              "|---|---|" + "---|" * len(COMPARE_COLUMNS)]
    lines += [f"| {r['method']} | `{r['run_dir']}` | " + " | ".join(_fmt(r[k]) for k, _ in COMPARE_COLUMNS) + " |"
              for r in rows]
    paths = {"json": _write_text(os.path.join(out_dir, "compare.json"), json.dumps(rows, indent=2, allow_nan=False)),
             "table": _write_text(os.path.join(out_dir, "compare.md"), "\n".join(lines) + "\n")}

    panels = [("ammd", "AMMD (lower = better)"), ("bwt_mmd", "BwT-MMD (+ = forgetting)"),
              ("final_accuracy", "final accuracy"), ("train_seconds", "train time (s)")]
    labels = [f"{r['method']}\n{os.path.basename(os.path.normpath(r['run_dir']))}" for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        ax.bar(range(len(rows)), values, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"features: {features[0] if len(features) == 1 else 'MIXED'}", fontsize=8, y=1.06)
    paths["plot"] = _save_figure(fig, os.path.join(out_dir, "compare.png"))
    return paths
