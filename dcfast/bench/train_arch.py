"""`dcfast bench train --arch sd15`: one training step of `lora`, `ewc-dc` and `dsc` on a real architecture
(`dcfast.models.architectures`: the published config built in code, random weights, nothing downloaded), its
seconds and peak resident memory, each method in a process of its own so that peaks do not mix.

Each method's own code runs, on the `Models` and `TaskData` the trainer would hand it at task n = 3 (two earlier
concepts, so that S holds EWC-DC's default k = 4 concepts), after what a resume restores at the end of task 2:
EWC's Fisher and anchor, DSC's pool of earlier LoRAs. One image per step, fp32, the run config's defaults (LoRA
rank 4 on the attention projections) except a fixed temperature: "auto" measures it once per task (setup, not a
step). What a step is, per method (the `path` column says which, `rows` how many U-Net rows it ran):

    lora     Method.loss (the denoising loss under c_n), its backward and the AdamW step.
    ewc-dc   the denoising loss and EWC penalty, and the DC term at the default (k, T) with its gradient through
             `dcfast.dc_loss_backward` in chunks of CHUNK_ROWS rows, then AdamW. EWCDC.loss itself calls
             `dc_log_probs`, whose graph spans all k*T rows at once (`ewc_dc_bounded_step`).
    dsc      one distillation iteration, `Distiller.distill` with one iteration (teachers, student, AdamW), its U-Net
             calls with grad checkpointed in pieces of CHUNK_ROWS rows (`CheckpointedCalls`; the DC engine's chunks
             the same; glibc's mmap threshold fixed, WORKER_ENV): the student's DC scores and noise predictions
             hold one graph over k*T + 2T rows. With diffusers' per-block gradient checkpointing instead (which the
             trainer turns off for consolidation) the step peaked at 10.6 GB at 32x32 latents, 6.4 GB above the
             model: about four times that at 64x64, over this machine's memory.

The tokenizer is dcfast's tiny CLIP tokenizer (prompts padded to 77 tokens, as SD's): the vocabulary changes no
cost. Every worker caps its data segment at MEMORY_CAP_GB, so a path that needs more fails with an allocation
error (its row says so) instead of taking the machine. The H100 columns are an estimate, not a measurement
(`gpu_estimate`).
"""
from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from dcfast.bench.common import environment, format_table

METHODS = ("lora", "ewc-dc", "dsc")
QUICK_LATENT_SIZE = 32  # --quick: a quarter of SD 1.5's 64x64 latent pixels
MEMORY_CAP_GB = 16.0  # each worker's data segment (RLIMIT_DATA): the shared 24 GB machine's limit per process
# U-Net rows whose graph is held at once in ewc-dc's DC gradient and dsc's student (the DC engine's dc_max_batch and
# CheckpointedCalls' pieces): one, the least memory. A 64x64 row holds ~1.9 GB of graph; with 2-row pieces dsc's
# 32x32 step peaked 3.6 GB above the model, which scaled by the latents' area would near the cap at 64x64.
CHUNK_ROWS = 1
# Environment of a method's worker. dsc: glibc's malloc serves every block of 256 KiB or more by mmap, returned on
# free. With its default (a threshold that rises with freed blocks) the checkpointed forward grew the heap by about
# half a graph per row though torch held one row's activations (profiler), and the 64x64 step passed the cap.
WORKER_ENV = {"dsc": {"MALLOC_MMAP_THRESHOLD_": "262144"}}
MAX_STEPS, STEP_BUDGET_S = 3, 120.0  # full runs time steps until 3 are done or 120 s have passed (at least one)
TEMPERATURE = 1e-3  # on the auto temperature's scale (ewc_dc.DCScoreSettings); no step's cost depends on it
WORDS = ("mug", "cat", "dog")  # the three tasks' class words; the timed task is the last
# The estimate's GPU: H100 SXM 80 GB, dense fp32 without tensor cores (NVIDIA's datasheet), the table's precision.
H100_FP32_TFLOPS = 67.0
H100_UTILISATION = 0.5  # assumed fraction of that peak a U-Net's convolutions and matmuls reach

COLUMNS = ["method", "path", "steps", "step_s", "ratio_vs_lora", "rows_no_grad", "rows_grad", "rows_recomputed",
           "setup_rss_gb", "peak_rss_gb"]
GPU_COLUMNS = ["method", "gflop_per_step", "cpu_gflop_per_s", "h100_est_step_s", "h100_est_ratio_vs_lora",
               "h100_est_mem_gb"]


# ------------------------------------------------------------------------------------------------------
# The worker: one method, one process.
# ------------------------------------------------------------------------------------------------------

def _status_gb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in GB."""
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.M).group(1)) / 1e6


def _reset_peak_rss() -> None:
    """Start the process's peak RSS (VmHWM) afresh from the current RSS (Linux: clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


class CheckpointedCalls(torch.nn.Module):
    """A U-Net whose calls with grad run in pieces of at most `rows` rows, each keeping only its inputs for the
    backward and recomputing its activations there (`torch.utils.checkpoint`): a loss whose graph spans many rows,
    as DSC's student over k*T + 2T, then holds one piece's activations at a time, the memory of
    `dc_loss_backward`'s chunks. The DC engine runs a wrapped U-Net by plain calls (without its shared work)."""

    def __init__(self, unet: torch.nn.Module, rows: int):
        super().__init__()
        self.unet, self.rows = unet, rows
        self.recomputing = False  # True while a piece's activations are recomputed in the backward

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs):
        if not torch.is_grad_enabled():
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        n = sample.shape[0]
        out = torch.cat([self._piece(*(_row_slice(value, i, i + self.rows, n)
                                       for value in (sample, timestep, encoder_hidden_states, kwargs)))
                         for i in range(0, n, self.rows)])
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _piece(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        calls = []

        def call(sample, timestep, encoder_hidden_states):
            calls.append(None)
            self.recomputing = len(calls) > 1
            try:
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
            finally:
                self.recomputing = False

        return checkpoint(call, sample, timestep, encoder_hidden_states, use_reentrant=False)


def _row_slice(value, start: int, stop: int, rows: int):
    """Rows [start, stop) of a per-row tensor (first dim `rows`), of each such tensor in a dict; other values as is."""
    if isinstance(value, dict):
        return {key: _row_slice(item, start, stop, rows) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
        return value[start:stop]
    return value


class RowCounter:
    """U-Net rows run without grad, with grad, and recomputed in a backward (`recomputing()` true), counted at
    conv_out (every row's last layer) by wrapping its forward: a module hook would turn the DC engine's shared
    work and chunk autotuning off."""

    def __init__(self, unet: torch.nn.Module, recomputing: Callable[[], bool] = lambda: False):
        self.no_grad = self.grad = self.recomputed = 0
        forward = unet.conv_out.forward

        def counted(x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                self.no_grad += x.shape[0]
            elif recomputing():
                self.recomputed += x.shape[0]
            else:
                self.grad += x.shape[0]
            return forward(x)

        unet.conv_out.forward = counted


def ewc_dc_bounded_step(method, x0: torch.Tensor) -> None:
    """Backpropagate EWC-DC's step loss (denoising loss + delta x DC term + EWC penalty) with the DC term's
    gradient through `dc_loss_backward`, in chunks of `dc_max_batch` rows.

    The pieces are the method's own (its concepts S, the (t, eps) draw, `term`, `denoise`, `penalty`, the task's
    temperature); what differs from EWCDC.loss is the DC gradient's route: there `dc_log_probs` keeps one autograd
    graph over all k*T rows, which at SD 1.5's size is more memory than this machine has.
    """
    from dcfast.engine.scores import dc_logits, dc_loss_backward
    from dcfast.training.objectives import dc_log_softmax, random_pairs

    task, settings, models = method.task, method.settings, method.models
    conds = models.encode(method.concepts(task, task.shared_generator))
    timesteps, noise = random_pairs(models.noise_scheduler, x0, settings.num_dc_timesteps, task.generator)
    weight = settings.dc_every * settings.delta
    dc_loss_backward(models.unet, models.noise_scheduler, x0, conds.hidden,
                     lambda err: weight * method.term(dc_log_softmax(dc_logits(err.double(), method.temperature))),
                     timesteps=timesteps, noise=noise, loss=settings.dc_loss, max_batch=settings.dc_max_batch,
                     **conds.engine_kwargs(task.batch_time_ids))
    (method.denoise(x0) + method.penalty()).backward()


def _config(method: str, arch: str, output_dir: str):
    """The run config the trainer would hold for three tasks of `method`, the DC engine's chunks CHUNK_ROWS rows."""
    from dcfast.training.config import TrainConfig

    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=arch, output_dir=output_dir, method=method, train_batch_size=1,
        tasks=[{"images": output_dir, "class_word": word} for word in WORDS],
        temperature=TEMPERATURE, dsc_iterations=1), ignore_other_methods=True)
    settings = config.method_settings
    if hasattr(settings, "dc_max_batch"):
        settings.dc_max_batch = CHUNK_ROWS
    return config


def _past_state(method, unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What a resume restores after task 2: EWC's Fisher (ones) and anchor, DSC's pool of two earlier LoRAs."""
    from dcfast.training.adapters import lora_state
    from dcfast.training.methods import EWC, DSC

    lora = lora_state(unet)
    if isinstance(method, EWC):
        return {**{f"fisher.{k}": torch.ones_like(v) for k, v in lora.items()},
                **{f"anchor.{k}": v for k, v in lora.items()}}
    if isinstance(method, DSC):
        return {f"pool.{i}.{k}": v.clone() for i in range(len(WORDS) - 1) for k, v in lora.items()}
    return {}


def _setup(method_name: str, arch_name: str, size: int,
           output_dir: str) -> Tuple[Callable[[], None], RowCounter, float]:
    """Build the model and `method_name` at task 3 of three; returns (one training step of it, the counter of its
    U-Net rows, the RSS in GB before the model was built, the libraries loaded)."""
    from accelerate import Accelerator

    from dcfast.models.architectures import build_scheduler, build_text_encoders, build_unet
    from dcfast.models.tiny import tiny_tokenizer
    from dcfast.training.adapters import add_lora
    from dcfast.training.methods import Models, TaskData, get_method
    from dcfast.training.tokens import add_task_tokens

    base_rss = _status_gb("VmRSS")
    config = _config(method_name, arch_name, output_dir)
    unet = build_unet(arch_name, seed=config.seed)
    encoders = build_text_encoders(arch_name, seed=config.seed)
    if len(encoders) != 1:
        raise ValueError(f"arch: {arch_name!r} has {len(encoders)} text encoders; this bench drives one")
    text_encoder, tokenizer = encoders[0], tiny_tokenizer()
    for module in (unet, text_encoder):
        module.requires_grad_(False)
    add_lora(unet, config.rank, config.resolved_lora_alpha(), config.target_modules, config.seed)
    wrapped = CheckpointedCalls(unet, CHUNK_ROWS) if method_name == "dsc" else None
    counter = RowCounter(unet, (lambda: wrapped.recomputing) if wrapped is not None else (lambda: False))
    models = Models(wrapped or unet, text_encoder, tokenizer, build_scheduler(arch_name), Accelerator(cpu=True),
                    progress=False)
    method = get_method(method_name)(config, models)
    method.load_state_dict(_past_state(method, models.unet))
    tokens = [config.token_template.format(index=i) for i in range(1, len(WORDS) + 1)]
    task_tokens = [add_task_tokens(models.text_pairs(), token, word) for token, word in zip(tokens, WORDS)]
    for past in task_tokens[:-1]:
        for token in past:
            token.freeze()
    prompts = [spec.task_prompt(token) for spec, token in zip(config.tasks, tokens)]
    latents = torch.randn((1, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
    task = TaskData(index=len(WORDS), latents=latents, prompt=prompts[-1],
                    pretrained_concept_prompt=config.pretrained_concept_prompt.format(class_word=WORDS[-1]),
                    past_prompts=prompts[:-1], generator=torch.Generator().manual_seed(1),
                    shared_generator=torch.Generator().manual_seed(2), seed=config.seed)
    method.begin_task(task)
    if method_name == "dsc":  # consolidation: the task's token is frozen, the distiller owns its optimizer
        for token in task_tokens[-1]:
            token.freeze()
        return (lambda: method.distiller.distill(task, method.temperature)), counter, base_rss
    models.token = task_tokens[-1][0]
    params = list(models.lora().values())
    token_params = [token.param for token in task_tokens[-1]]
    optimizer = torch.optim.AdamW([{"params": params, "lr": config.learning_rate},
                                   {"params": token_params, "lr": config.token_learning_rate, "weight_decay": 0.0}])

    def step() -> None:
        if method_name == "ewc-dc":
            ewc_dc_bounded_step(method, latents)
        else:
            method.loss(latents)[0].backward()
        torch.nn.utils.clip_grad_norm_(params + token_params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, counter, base_rss


PATHS = {
    "lora": "Method.loss + backward + AdamW",
    "ewc-dc": f"denoise + penalty + DC term via dc_loss_backward, {CHUNK_ROWS}-row chunks",
    "dsc": f"Distiller.distill, 1 iteration, U-Net calls checkpointed in {CHUNK_ROWS}-row pieces, mmap threshold",
}


def measure(method: str, arch: str, size: int, quick: bool) -> Dict[str, object]:
    """One method's step seconds, U-Net rows per step and RSS in this process (meant to be a fresh one)."""
    cap = int(MEMORY_CAP_GB * 1e9)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        step, counter, base = _setup(method, arch, size, folder)
        setup_s, setup_rss = time.perf_counter() - started, _status_gb("VmRSS")
        counter.no_grad = counter.grad = counter.recomputed = 0  # from here: the timed steps' rows
        _reset_peak_rss()
        times: List[float] = []
        while not times or not (quick or len(times) >= MAX_STEPS or sum(times) >= STEP_BUDGET_S):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        peak = _status_gb("VmHWM")
    return {"method": method, "path": PATHS[method], "latents": f"{size}x{size}", "steps": len(times),
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "step_times": times,
            "rows_no_grad": counter.no_grad / len(times), "rows_grad": counter.grad / len(times),
            "rows_recomputed": counter.recomputed / len(times), "base_rss_gb": base, "setup_rss_gb": setup_rss,
            "peak_rss_gb": peak, "setup_s": setup_s}


# ------------------------------------------------------------------------------------------------------
# The parent: one worker per method, the table, the estimate.
# ------------------------------------------------------------------------------------------------------

def _run_worker(method: str, arch: str, size: int, quick: bool) -> Dict[str, object]:
    """`measure` in a fresh Python process with this process's torch threads and the method's WORKER_ENV; a failed
    one's row says why."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        spec = {"method": method, "arch": arch, "size": size, "quick": quick, "threads": torch.get_num_threads(),
                "out": str(out)}
        done = subprocess.run([sys.executable, "-m", "dcfast.bench.train_arch", json.dumps(spec)],
                              capture_output=True, text=True, env={**os.environ, **WORKER_ENV.get(method, {})})
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"method": method, "path": PATHS[method], "latents": f"{size}x{size}",
            "error": f"exit {done.returncode}: {lines[-1] if lines else 'no message'}"}


def gpu_estimate(rows: List[Dict[str, object]], arch: str, size: int) -> List[Dict[str, object]]:
    """The H100 (80 GB) columns: an estimate from FLOPs and the CPU's measured memory, not a measurement.

    FLOPs per step = forward FLOPs of one U-Net row (`dcfast.bench.flops.row_flops`: convolutions, linear layers,
    attention matmuls) x (rows without grad + 2 x rows with grad, the backward through frozen weights costing about
    one forward, + rows recomputed in the backward); the text encoder is left out (~2% of lora's step, less of the
    others'). Seconds = FLOPs / (H100_UTILISATION x H100_FP32_TFLOPS): a compute-bound rate, too low at small latents
    where kernel launches dominate. Memory = the step's peak RSS less the process's RSS before the model was built:
    the same fp32 tensors on the GPU, without the CUDA context, and with the CPU heap's freed-but-kept blocks (so an
    upper bound).
    """
    from dcfast.bench.flops import row_flops
    from dcfast.models.architectures import build_unet, get_architecture

    tokens = int(get_architecture(arch).text_encoders[0][1]["max_position_embeddings"])
    per_row = row_flops(build_unet(arch, device="meta"), size, tokens)["total"]
    estimates = []
    for row in rows:
        if "error" in row:
            continue
        flops = per_row * (row["rows_no_grad"] + 2 * row["rows_grad"] + row["rows_recomputed"])
        estimates.append({"method": row["method"], "gflop_per_step": flops / 1e9,
                          "cpu_gflop_per_s": flops / row["step_s"] / 1e9,
                          "h100_est_step_s": flops / (H100_UTILISATION * H100_FP32_TFLOPS * 1e12),
                          "h100_est_mem_gb": row["peak_rss_gb"] - row["base_rss_gb"]})
    lora = next((e for e in estimates if e["method"] == "lora"), None)
    for estimate in estimates:
        if lora is not None:
            estimate["h100_est_ratio_vs_lora"] = estimate["h100_est_step_s"] / lora["h100_est_step_s"]
    return estimates


def run(arch: str, quick: bool = False, device: str = "cpu", latent_size: Optional[int] = None) -> Dict[str, object]:
    """Measure every method of METHODS on `arch` (each in its own process, one after another), print the table
    and the H100 estimate; returns rows, estimate, summary and environment."""
    from dcfast.models.architectures import get_architecture

    if device != "cpu":
        raise ValueError(f"dcfast bench train --arch {arch} measures on the CPU; use --device cpu")
    size = latent_size or (QUICK_LATENT_SIZE if quick else get_architecture(arch).latent_size)
    load_before = os.getloadavg()[0]  # a shared machine's other work slows every row: recorded beside them
    rows = []
    for method in METHODS:
        print(f"[bench train --arch {arch}] {method}: measuring in its own process ...", file=sys.stderr, flush=True)
        rows.append(_run_worker(method, arch, size, quick))
    lora = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
    for row in rows:
        if lora is not None and "error" not in row:
            row["ratio_vs_lora"] = row["step_s"] / lora["step_s"]
    estimate = gpu_estimate(rows, arch, size)
    mode = f"--quick: {size}x{size} latents, 1 timed step each" if quick else f"{size}x{size} latents"
    load = (load_before, os.getloadavg()[0])
    print(f"dcfast bench train --arch {arch} ({mode}; fp32, LoRA rank 4, 1 image per step, "
          f"{torch.get_num_threads()} threads, each method in its own process, data capped at {MEMORY_CAP_GB:g} GB; "
          f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after)")
    print(format_table(rows, COLUMNS + (["error"] if any("error" in r for r in rows) else [])))
    print(f"\nH100 80 GB: an ESTIMATE, not a measurement (FLOPs / {H100_UTILISATION:g} x {H100_FP32_TFLOPS:g} "
          f"fp32 TFLOP/s; memory = the CPU step's tensors; see dcfast.bench.train_arch.gpu_estimate)")
    print(format_table(estimate, GPU_COLUMNS))
    measured = [r for r in rows if "ratio_vs_lora" in r]
    slowest = max(measured, key=lambda r: r["ratio_vs_lora"], default=None)
    summary = {"arch": arch, "latent_size": size, "quick": quick, "load_average": load,
               "failed": [r["method"] for r in rows if "error" in r],
               "max_step_ratio_vs_lora": slowest["ratio_vs_lora"] if slowest else float("nan"),
               "slowest_method": slowest["method"] if slowest else None}
    return {"rows": rows, "h100_estimate": estimate, "summary": summary, "environment": environment(device)}


def main(argv: List[str]) -> int:
    """The worker's entry point: `python -m dcfast.bench.train_arch SPEC_JSON` writes `measure`'s row to spec's out."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    row = measure(spec["method"], spec["arch"], spec["size"], spec["quick"])
    Path(spec["out"]).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
