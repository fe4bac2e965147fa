"""`dcfast bench train --arch sd15|sdxl`: one training step of `lora`, `ewc-dc` and `dsc` on a real architecture
(`dcfast.models.architectures`: the published config built in code, random weights, nothing downloaded), its
seconds and peak resident memory, each method in a process of its own so that peaks do not mix.

Each method's own code runs, on the `Models` and `TaskData` the trainer would hand it at task n = 3 (two earlier
concepts, so that S holds EWC-DC's default k = 4 concepts), after what a resume restores at the end of task 2:
EWC's Fisher and anchor, DSC's pool of earlier LoRAs. One image per step, the run config's defaults (LoRA rank 4
on the attention projections) except a fixed temperature: "auto" measures it once per task (setup, not a step).
Precision and gradient checkpointing are the architecture's (ARCH_SETTINGS): SD 1.5 in fp32; SDXL, whose fp32
weights alone are 13.6 GB, with its frozen weights in bf16 under bf16 autocast (the trainer's mixed_precision
"bf16") and diffusers' gradient checkpointing in the lora and ewc-dc steps (the trainer's gradient_checkpointing;
dsc's consolidation runs without it, as the trainer's does). SDXL's added conditions are the trainer's: both text
encoders' pooled embedding and the time ids of a centre-cropped square photo at the latents' resolution. What a
step is, per method (the `path` column says which, `rows` how many U-Net rows it ran):

    lora     Method.loss (the denoising loss under c_n), its backward and the AdamW step.
    ewc-dc   EWCDC.loss (denoising loss, EWC penalty, the DC term at the default (k, T)) with `dc_checkpoint` and
             `dc_max_batch` = CHUNK_ROWS: each DC chunk's activations recomputed in the backward, as a user at this
             size would set it (without, its graph spans all k*T rows at once: ~32 GB at SD 1.5's 64x64), then
             its backward and AdamW.
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
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from dcfast.bench.common import environment, format_table

METHODS = ("lora", "ewc-dc", "dsc")
QUICK_LATENT_SIZE = 32  # --quick: a quarter of SD 1.5's 64x64 latent pixels
MEMORY_CAP_GB = 16.0  # each worker's data segment (RLIMIT_DATA): the shared 24 GB machine's limit per process
# Per architecture: the frozen weights' precision (TrainConfig.mixed_precision) and diffusers' gradient checkpointing
# in the lora and ewc-dc steps. SDXL's fp32 U-Net and text encoders (3.38B parameters, 13.6 GB) leave no room for a
# step under MEMORY_CAP_GB; this CPU (AVX512-BF16) runs bf16 convolutions and matmuls about twice as fast as fp32.
ARCH_SETTINGS = {"sd15": {"mixed_precision": "no", "gradient_checkpointing": False},
                 "sdxl": {"mixed_precision": "bf16", "gradient_checkpointing": True}}
# U-Net rows whose graph is held at once in ewc-dc's DC gradient and dsc's student (the DC engine's dc_max_batch and
# CheckpointedCalls' pieces): one, the least memory. A 64x64 row holds ~1.9 GB of graph; with 2-row pieces dsc's
# 32x32 step peaked 3.6 GB above the model, which scaled by the latents' area would near the cap at 64x64.
CHUNK_ROWS = 1
# Environment of a method's worker. dsc and ewc-dc, whose rows are recomputed in the backward: glibc's malloc serves
# every block of 256 KiB or more by mmap, returned on free. With its default (a threshold that rises with freed
# blocks) the checkpointed forward grew the heap by about half a graph per row though torch held one row's
# activations (profiler), and the 64x64 step passed the cap (dsc; ewc-dc with dc_checkpoint on SD 1.5 too).
WORKER_ENV = {method: {"MALLOC_MMAP_THRESHOLD_": "262144"} for method in ("dsc", "ewc-dc")}
MAX_STEPS, STEP_BUDGET_S = 3, 120.0  # full runs time steps until 3 are done or 120 s have passed (at least one)
TEMPERATURE = 1e-3  # on the auto temperature's scale (ewc_dc.DCScoreSettings); no step's cost depends on it
WORDS = ("mug", "cat", "dog")  # the three tasks' class words; the timed task is the last
# The estimate's GPU: H100 SXM 80 GB, dense throughput by the run's precision (NVIDIA's datasheet): fp32 without
# tensor cores, bf16 with them.
H100_TFLOPS = {"no": 67.0, "bf16": 989.0}
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
    the DC engine's dc_checkpoint chunks. The DC engine runs a wrapped U-Net by plain calls (without its shared work)."""

    def __init__(self, unet: torch.nn.Module, rows: int):
        super().__init__()
        self.unet, self.rows = unet, rows

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
        def call(sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

        return checkpoint(call, sample, timestep, encoder_hidden_states, use_reentrant=False)


def _row_slice(value, start: int, stop: int, rows: int, min_dim: int = 1):
    """Rows [start, stop) of a per-row tensor (first dim `rows`); in a dict (SDXL's added conditions: text_embeds
    (rows, P), time_ids (rows, 6) or one (6,) for all) of each such tensor of 2+ dims; other values as is."""
    if isinstance(value, dict):
        return {key: _row_slice(item, start, stop, rows, min_dim=2) for key, item in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() >= min_dim and value.shape[0] == rows:
        return value[start:stop]
    return value


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward in this thread: checkpointed activations being recomputed."""
    return torch._C._current_graph_task_id() != -1


class RowCounter:
    """U-Net rows run per step, counted by wrapping forwards (a module hook would turn the DC engine's shared work and
    chunk autotuning off): at conv_out, every row's last layer, the rows run without grad and with grad; at the last up
    block's last resnet, the rows whose body ran again inside a backward (`recomputed`): checkpointed whole (the
    engine's dc_checkpoint, CheckpointedCalls) or block by block (diffusers' gradient checkpointing), once per
    recomputation, nested ones included."""

    def __init__(self, unet: torch.nn.Module):
        self.reset()
        forward = unet.conv_out.forward
        resnet = unet.up_blocks[-1].resnets[-1]
        resnet_forward = resnet.forward

        def counted(x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled():
                self.no_grad += x.shape[0]
            elif not _in_backward():
                self.grad += x.shape[0]
            return forward(x)

        def counted_in_blocks(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if _in_backward():
                self.recomputed += x.shape[0]
            return resnet_forward(x, *args, **kwargs)

        unet.conv_out.forward = counted
        resnet.forward = counted_in_blocks

    def reset(self) -> None:
        self.no_grad = self.grad = self.recomputed = 0


class PromptCounter:
    """Prompts each text encoder ran per step, counted by wrapping its forward: `no_grad[i]` those whose states need
    no gradient, `grad[i]` those that carry one back to the trained token (their backward runs the encoder again)."""

    def __init__(self, encoders: List[torch.nn.Module]):
        self.encoders = encoders
        self.reset()
        for i, encoder in enumerate(encoders):
            encoder.forward = self._counted(i, encoder.forward)

    def _counted(self, i: int, forward: Callable) -> Callable:
        def counted(input_ids: torch.Tensor, *args, **kwargs):
            out = forward(input_ids, *args, **kwargs)
            tally = self.grad if out.last_hidden_state.requires_grad else self.no_grad
            tally[i] += input_ids.shape[0]
            return out
        return counted

    def reset(self) -> None:
        self.no_grad, self.grad = [0] * len(self.encoders), [0] * len(self.encoders)


def _config(method: str, arch: str, output_dir: str, mixed_precision: str):
    """The run config the trainer would hold for three tasks of `method`, the DC engine's chunks CHUNK_ROWS rows."""
    from dcfast.training.config import TrainConfig

    config = TrainConfig.from_dict(dict(
        pretrained_model_name_or_path=arch, output_dir=output_dir, method=method, train_batch_size=1,
        tasks=[{"images": output_dir, "class_word": word} for word in WORDS], mixed_precision=mixed_precision,
        gradient_checkpointing=ARCH_SETTINGS[arch]["gradient_checkpointing"],
        temperature=TEMPERATURE, dsc_iterations=1), ignore_other_methods=True)
    settings = config.method_settings
    if hasattr(settings, "dc_max_batch"):
        settings.dc_max_batch = CHUNK_ROWS
    if method == "ewc-dc":  # its DC term bounded by its chunks, as a user at this size sets it (dsc: CheckpointedCalls)
        settings.dc_checkpoint = True
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


class Setup(NamedTuple):
    """A method ready at task 3 of three: one training step of it, the counters of its U-Net rows and prompts, the
    RSS in GB before the model was built (the libraries loaded), and the bare U-Net with its adapter."""

    step: Callable[[], None]
    rows: RowCounter
    prompts: PromptCounter
    base_rss_gb: float
    unet: torch.nn.Module


def _setup(method_name: str, arch_name: str, size: int, output_dir: str, mixed_precision: str) -> Setup:
    """Build the model and `method_name` at task 3 of three, as the trainer would (see the module doc)."""
    from types import SimpleNamespace

    from dcfast.models.architectures import build_scheduler, build_text_encoders, build_unet, get_architecture
    from dcfast.models.prompts import sdxl_time_ids
    from dcfast.models.tiny import tiny_tokenizer
    from dcfast.training.adapters import add_lora
    from dcfast.training.methods import Models, TaskData, get_method
    from dcfast.training.tokens import add_task_tokens
    from dcfast.training.trainer import WEIGHT_DTYPES, cast_frozen_weights, new_accelerator

    base_rss = _status_gb("VmRSS")
    config = _config(method_name, arch_name, output_dir, mixed_precision)
    unet = build_unet(arch_name, seed=config.seed)
    encoders = build_text_encoders(arch_name, seed=config.seed)
    if len(encoders) > 2:
        raise ValueError(f"arch: {arch_name!r} has {len(encoders)} text encoders; the trainer drives one or two")
    tokenizers = [tiny_tokenizer() for _ in encoders]
    for module in (unet, *encoders):
        module.requires_grad_(False)
    add_lora(unet, config.rank, config.resolved_lora_alpha(), config.target_modules, config.seed)
    if WEIGHT_DTYPES[mixed_precision] is not None:  # the adapter keeps fp32, as in the trainer
        cast_frozen_weights(SimpleNamespace(unet=unet, text_encoder=encoders[0], vae=None,
                                            text_encoder_2=encoders[1] if len(encoders) > 1 else None),
                            WEIGHT_DTYPES[mixed_precision])
    if config.gradient_checkpointing and method_name != "dsc":  # the trainer's consolidation runs without it
        unet.enable_gradient_checkpointing()
    wrapped = CheckpointedCalls(unet, CHUNK_ROWS) if method_name == "dsc" else None
    counter = RowCounter(unet)
    prompts_counter = PromptCounter(encoders)
    accelerator = new_accelerator(mixed_precision, cpu=True)
    models = Models(wrapped or unet, encoders[0], tokenizers[0], build_scheduler(arch_name), accelerator,
                    progress=False, text_encoder_2=encoders[1] if len(encoders) > 1 else None,
                    tokenizer_2=tokenizers[1] if len(encoders) > 1 else None)
    method = get_method(method_name)(config, models)
    method.load_state_dict(_past_state(method, models.unet))
    tokens = [config.token_template.format(index=i) for i in range(1, len(WORDS) + 1)]
    task_tokens = [add_task_tokens(models.text_pairs(), token, word) for token, word in zip(tokens, WORDS)]
    for past in task_tokens[:-1]:
        for token in past:
            token.freeze()
    prompts = [spec.task_prompt(token) for spec, token in zip(config.tasks, tokens)]
    latents = torch.randn((1, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
    time_ids = None
    if get_architecture(arch_name).is_sdxl:  # a square photo at the latents' resolution, centre-cropped
        pixels = size * 8  # the SDXL VAE's downsampling
        time_ids = sdxl_time_ids((pixels, pixels), (0, 0), (pixels, pixels))[None]
    task = TaskData(index=len(WORDS), latents=latents, prompt=prompts[-1],
                    pretrained_concept_prompt=config.pretrained_concept_prompt.format(class_word=WORDS[-1]),
                    past_prompts=prompts[:-1], generator=torch.Generator().manual_seed(1),
                    shared_generator=torch.Generator().manual_seed(2), seed=config.seed, time_ids=time_ids,
                    batch_time_ids=time_ids)
    method.begin_task(task)
    if method_name == "dsc":  # consolidation: the task's token is frozen, the distiller owns its optimizer
        for token in task_tokens[-1]:
            token.freeze()
        def distill_step() -> None:
            _autocast(accelerator, method.distiller.distill, task, method.temperature)

        return Setup(distill_step, counter, prompts_counter, base_rss, unet)
    models.token = task_tokens[-1][0]
    params = list(models.lora().values())
    token_params = [token.param for token in task_tokens[-1]]
    optimizer = torch.optim.AdamW([{"params": params, "lr": config.learning_rate},
                                   {"params": token_params, "lr": config.token_learning_rate, "weight_decay": 0.0}])

    def step() -> None:
        _autocast(accelerator, lambda: method.loss(latents)[0].backward())
        torch.nn.utils.clip_grad_norm_(params + token_params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Setup(step, counter, prompts_counter, base_rss, unet)


def _autocast(accelerator, function: Callable, *args):
    """`function(*args)` under the accelerator's autocast (the trainer's: a no-op in fp32)."""
    with accelerator.autocast():
        return function(*args)


PATHS = {
    "lora": "Method.loss + backward + AdamW",
    "ewc-dc": f"Method.loss (dc_checkpoint, {CHUNK_ROWS}-row chunks) + backward + AdamW",
    "dsc": f"Distiller.distill, 1 iteration, U-Net calls checkpointed in {CHUNK_ROWS}-row pieces",
}
PRECISIONS = ("no", "bf16")  # fp16 is left out: accelerate runs no fp16 autocast on the CPU


def _path(method: str, arch: str) -> str:
    """What one step of `method` runs on `arch` (the table's `path`)."""
    checkpointed = ARCH_SETTINGS[arch]["gradient_checkpointing"] and method != "dsc"
    return PATHS[method] + (", gradient checkpointing" if checkpointed else "")


def measure(method: str, arch: str, size: int, quick: bool, mixed_precision: str = "no") -> Dict[str, object]:
    """One method's step seconds, U-Net rows per step and RSS in this process (meant to be a fresh one)."""
    cap = int(MEMORY_CAP_GB * 1e9)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        step, counter, prompts, base, _ = _setup(method, arch, size, folder, mixed_precision)
        setup_s, setup_rss = time.perf_counter() - started, _status_gb("VmRSS")
        counter.reset()  # from here: the timed steps' rows and prompts
        prompts.reset()
        _reset_peak_rss()
        times: List[float] = []
        while not times or not (quick or len(times) >= MAX_STEPS or sum(times) >= STEP_BUDGET_S):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        peak = _status_gb("VmHWM")
    return {"method": method, "path": _path(method, arch), "latents": f"{size}x{size}", "steps": len(times),
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "step_times": times,
            "rows_no_grad": counter.no_grad / len(times), "rows_grad": counter.grad / len(times),
            "rows_recomputed": counter.recomputed / len(times),
            "prompts_no_grad": [n / len(times) for n in prompts.no_grad],
            "prompts_grad": [n / len(times) for n in prompts.grad], "base_rss_gb": base, "setup_rss_gb": setup_rss,
            "peak_rss_gb": peak, "setup_s": setup_s, "mixed_precision": mixed_precision}


# ------------------------------------------------------------------------------------------------------
# The parent: one worker per method, the table, the estimate.
# ------------------------------------------------------------------------------------------------------

def _run_worker(method: str, arch: str, size: int, quick: bool, mixed_precision: str) -> Dict[str, object]:
    """`measure` in a fresh Python process with this process's torch threads and the method's WORKER_ENV; a failed
    one's row says why."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "row.json"
        spec = {"method": method, "arch": arch, "size": size, "quick": quick, "mixed_precision": mixed_precision,
                "threads": torch.get_num_threads(), "out": str(out)}
        done = subprocess.run([sys.executable, "-m", "dcfast.bench.train_arch", json.dumps(spec)],
                              capture_output=True, text=True, env={**os.environ, **WORKER_ENV.get(method, {})})
        if done.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"method": method, "path": _path(method, arch), "latents": f"{size}x{size}",
            "mixed_precision": mixed_precision, "error": f"exit {done.returncode}: {lines[-1] if lines else 'no message'}"}


def gpu_estimate(rows: List[Dict[str, object]], arch: str, size: int) -> List[Dict[str, object]]:
    """The H100 (80 GB) columns: an estimate from FLOPs and the CPU's measured memory, not a measurement.

    FLOPs per step = forward FLOPs of one U-Net row (`dcfast.bench.flops.row_flops`: convolutions, linear layers,
    attention matmuls) x (rows without grad + 2 x rows with grad, the backward through frozen weights costing about
    one forward, + rows recomputed in the backward, whole or block by block), + each text encoder's FLOPs per
    prompt (`text_flops`) x (prompts without grad + 2 x prompts with grad). Seconds = FLOPs / (H100_UTILISATION x H100_TFLOPS at the rows'
    precision): a compute-bound rate, too low at small latents where kernel launches dominate (and the more so in
    bf16, whose tensor-core peak few U-Net kernels approach). Memory = the step's peak RSS less the process's RSS
    before the model was built: the same tensors on the GPU, without the CUDA context, and with the CPU heap's
    freed-but-kept blocks (so an upper bound).
    """
    from dcfast.bench.flops import row_flops, text_flops
    from dcfast.models.architectures import build_text_encoders, build_unet, get_architecture

    tokens = int(get_architecture(arch).text_encoders[0][1]["max_position_embeddings"])
    per_row = row_flops(build_unet(arch, device="meta"), size, tokens)["total"]
    per_prompt = [text_flops(encoder, tokens) for encoder in build_text_encoders(arch, device="meta")]
    estimates = []
    for row in rows:
        if "error" in row:
            continue
        flops = per_row * (row["rows_no_grad"] + 2 * row["rows_grad"] + row["rows_recomputed"])
        flops += sum(f * (n + 2 * g) for f, n, g in zip(per_prompt, row["prompts_no_grad"], row["prompts_grad"]))
        estimates.append({"method": row["method"], "gflop_per_step": flops / 1e9,
                          "cpu_gflop_per_s": flops / row["step_s"] / 1e9,
                          "h100_est_step_s": flops / (H100_UTILISATION * H100_TFLOPS[row["mixed_precision"]] * 1e12),
                          "h100_est_mem_gb": row["peak_rss_gb"] - row["base_rss_gb"]})
    lora = next((e for e in estimates if e["method"] == "lora"), None)
    for estimate in estimates:
        if lora is not None:
            estimate["h100_est_ratio_vs_lora"] = estimate["h100_est_step_s"] / lora["h100_est_step_s"]
    return estimates


def run(arch: str, quick: bool = False, device: str = "cpu", latent_size: Optional[int] = None,
        methods: Optional[Sequence[str]] = None, mixed_precision: Optional[str] = None) -> Dict[str, object]:
    """Measure `methods` (default: every one of METHODS) on `arch`, each in its own process, one after another, at
    `mixed_precision` (default: ARCH_SETTINGS'); print the table and the H100 estimate; returns rows, estimate,
    summary and environment."""
    from dcfast.models.architectures import get_architecture

    if device != "cpu":
        raise ValueError(f"dcfast bench train --arch {arch} measures on the CPU; use --device cpu")
    methods = list(dict.fromkeys(methods or METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--method: bench train --arch measures {', '.join(METHODS)}; unknown {unknown}")
    mixed_precision = mixed_precision or ARCH_SETTINGS[arch]["mixed_precision"]
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"--mixed_precision: bench train --arch runs {' or '.join(PRECISIONS)} on the CPU, "
                         f"not {mixed_precision!r}")
    size = latent_size or (QUICK_LATENT_SIZE if quick else get_architecture(arch).latent_size)
    if size < 8 or size % 8:
        raise ValueError(f"--latent_size: a multiple of 8 (the U-Nets downsample it three times), got {size}")
    load_before = os.getloadavg()[0]  # a shared machine's other work slows every row: recorded beside them
    rows = []
    for method in methods:
        print(f"[bench train --arch {arch}] {method}: measuring in its own process ...", file=sys.stderr, flush=True)
        rows.append(_run_worker(method, arch, size, quick, mixed_precision))
    lora = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
    for row in rows:
        if lora is not None and "error" not in row:
            row["ratio_vs_lora"] = row["step_s"] / lora["step_s"]
    estimate = gpu_estimate(rows, arch, size)
    mode = f"--quick: {size}x{size} latents, 1 timed step each" if quick else f"{size}x{size} latents"
    load = (load_before, os.getloadavg()[0])
    precision = "fp32" if mixed_precision == "no" else f"frozen weights {mixed_precision} under autocast"
    checkpointing = ", gradient checkpointing" if ARCH_SETTINGS[arch]["gradient_checkpointing"] else ""
    print(f"dcfast bench train --arch {arch} ({mode}; {precision}{checkpointing}, LoRA rank 4, 1 image per step, "
          f"{torch.get_num_threads()} threads, each method in its own process, data capped at {MEMORY_CAP_GB:g} GB; "
          f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after)")
    print(format_table(rows, COLUMNS + (["error"] if any("error" in r for r in rows) else [])))
    unit = "fp32" if mixed_precision == "no" else mixed_precision
    print(f"\nH100 80 GB: an ESTIMATE, not a measurement (FLOPs / {H100_UTILISATION:g} x {H100_TFLOPS[mixed_precision]:g} "
          f"{unit} TFLOP/s; memory = the CPU step's tensors; see dcfast.bench.train_arch.gpu_estimate)")
    print(format_table(estimate, GPU_COLUMNS))
    measured = [r for r in rows if "ratio_vs_lora" in r]
    slowest = max(measured, key=lambda r: r["ratio_vs_lora"], default=None)
    summary = {"arch": arch, "latent_size": size, "quick": quick, "mixed_precision": mixed_precision,
               "load_average": load,
               "failed": [r["method"] for r in rows if "error" in r],
               "max_step_ratio_vs_lora": slowest["ratio_vs_lora"] if slowest else float("nan"),
               "slowest_method": slowest["method"] if slowest else None}
    return {"rows": rows, "h100_estimate": estimate, "summary": summary, "environment": environment(device)}


def main(argv: List[str]) -> int:
    """The worker's entry point: `python -m dcfast.bench.train_arch SPEC_JSON` writes `measure`'s row to spec's out."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    row = measure(spec["method"], spec["arch"], spec["size"], spec["quick"], spec["mixed_precision"])
    Path(spec["out"]).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
