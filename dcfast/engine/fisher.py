"""The Fisher accumulator: per-sample diagonal Fisher of nn.Linear (and nn.Conv2d) parameters, and of peft VeRA's
vectors, in one backward pass.

EWC and EWC-DC (docs/design.md) need `F = sum_n g_n**2` with `g_n = d loss_n / d theta` per sample, never the
square of a batch gradient. For an nn.Linear, sample n's weight gradient is G_n^T X_n (its output
gradients times its input rows), so one batched backward pass with module hooks gives every g_n;
`dcfast.ops.fisher_accumulate_` squares them into persistent float32 buffers tile by tile without
writing them to memory (docs/design.md: the per-sample Fisher kernel). peft's LoRA factors `lora_A` / `lora_B` are plain nn.Linear,
or nn.Conv2d for a LoRA on a convolution: a convolution is the same product over its unfolded input patches (one
row per output position, `torch.nn.functional.unfold`), its weight (O, C, kh, kw) seen as (O, C kh kw).
A peft VeRA layer adds lambda_b * (B_s (lambda_d * (A_s x))) to its base output (A_s, B_s: the shared frozen
matrices sliced to the layer's shape): with u = A_s x and G the output gradient, a row's gradient is G * (B_s
(lambda_d * u)) for lambda_b and u * (B_s^T (lambda_b * G)) for lambda_d, and sample n's is the sum over its rows,
squared like a bias's (docs/design.md: the per-sample Fisher of VeRA).

    acc = FisherAccumulator(unet)                  # every trainable LoRA nn.Linear (or VeRA vector) of the model
    with acc.track(num_samples=N):                 # the next forward/backward holds N samples
        per_sample_losses(unet, batch).sum().backward()
    acc.fisher                                     # {name in unet.named_parameters(): sum_n g_n**2}
    acc.decay_(gamma)                              # online EWC: F <- gamma F, then track the next task
    penalty = lam * acc.penalty(anchor)            # 1/2 sum F (theta - anchor)**2, differentiable
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from dcfast.ops.fisher import fisher_accumulate_

ParamSpec = Union[str, nn.Parameter]


@dataclass
class _Layer:
    """One tracked layer and the names of its tracked parameters (None: not tracked): an nn.Linear's or nn.Conv2d's
    weight and bias, or a peft VeRA layer's vectors lambda_b and lambda_d of adapter `vera`."""

    name: str
    module: nn.Module
    weight: Optional[str] = None
    bias: Optional[str] = None
    lambda_b: Optional[str] = None
    lambda_d: Optional[str] = None
    vera: Optional[str] = None  # the VeRA adapter name (a key of the layer's vera_lambda_b / vera_lambda_d)


@dataclass
class _Call:
    """One forward call of a tracked layer inside a track: its input rows (M, I) and where they start
    in the layer's row order of the track."""

    input: Optional[torch.Tensor]
    offset: int
    rows: int
    rows_per_eval: int  # rows per entry of the input's leading (model batch) dimension


@dataclass
class _Partial:
    """Pieces of one sample's gradient from calls that split its rows, summed until the sample is whole: the
    weight's, and those of the parameters whose gradient is a sum of row terms (`sums`, by name)."""

    weight: Optional[torch.Tensor] = None
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    rows: int = 0
    scale2: float = 1.0  # 1/loss_scale**2, applied to the squares


@dataclass
class _LayerTrack:
    """Per-track state of one layer."""

    rows: int = 0  # rows of all its calls so far
    rows_per_sample: Optional[int] = None  # fixed by the first gradient that arrives
    partial: Dict[int, _Partial] = field(default_factory=dict)


@dataclass
class _Track:
    num_samples: int
    grad_scale: float
    evals_per_sample: Optional[int]
    layers: Dict[int, _LayerTrack]
    calls: List[_Call] = field(default_factory=list)
    handles: list = field(default_factory=list)
    received: int = 0


class FisherAccumulator:
    """Diagonal empirical Fisher `sum_n (d loss_n / d theta)**2` of nn.Linear / nn.Conv2d parameters and peft VeRA
    vectors, per sample.

    Args:
        module: the model (e.g. a diffusers U-Net with a peft LoRA or VeRA adapter).
        params: what to track: parameter names (as in `module.named_parameters()`) or the parameters
            themselves, each the weight or bias of an nn.Linear or a plain nn.Conv2d, or a peft VeRA layer's
            `vera_lambda_b` / `vera_lambda_d`. Default: every trainable layer under a peft `lora_A` / `lora_B` (the
            LoRA factors) and every trainable VeRA vector; a model with neither is an error.

    `fisher[name]` is a float32 tensor shaped like the parameter, on its device.

    Rows and samples. A tracked layer's input (..., I) is read as rows (M, I). Inside
    `track(num_samples=N)` the rows of all calls of one layer, in call order, must be sample-major:
    the first R rows belong to sample 0, the next R to sample 1, ..., with R = (all its rows) / N.
    That holds when the model batch is ordered by sample with any number of rows per sample - tokens,
    and several model evaluations per sample (the DC loss of one image spans K*T U-Net rows, batched
    image-major) - whether the batch goes through in one call or in consecutive chunks (as
    `dcfast.dc_scores` does). Chunk boundaries need not fall between samples: the pieces of a sample
    split over two calls are summed before squaring (docs/design.md: the per-sample Fisher kernel; an (O, I) buffer per split sample),
    whole samples go straight through the fused kernel. Not sample-major, and not detectable: running
    the model twice over all N samples in one track (batch the two passes sample-major instead).
    A row total not divisible by N raises.

    Forward and backward may interleave inside a track (docs/design.md's memory-bounded DC gradient: memory-bounded recompute, e.g.
    `dcfast.dc_loss_backward`) only when R is known before the first gradient: pass
    `evals_per_sample` (K*T there), the number of entries of the model batch - the leading dimension
    of every tracked layer's input - per sample. Without it a layer that runs again after its
    gradient arrived raises. Samples may also be split over tracks (one track per chunk of whole
    samples): their squares add exactly. Each call's output may receive its gradient once (one
    backward per graph); activation checkpointing inside a track raises (disable it for the pass).

    Scaling (sum vs mean). The hooks see `d L / d output` of whatever scalar L is backpropagated.
    With `L = sum_n loss_n` these are exactly the per-sample gradients and `fisher` gains
    `sum_n g_n**2`. With the training-loop convention `L = mean_n loss_n = (1/N) sum_n loss_n`, every
    per-sample gradient arrives scaled by 1/N and the Fisher would come out N**2 times too small: pass
    `loss_scale=1/N` (in general, L = loss_scale * sum_n loss_n) and the accumulator divides the
    gradients by it. `fisher` is a sum over samples; divide by `samples_seen` for the mean form.
    """

    def __init__(self, module: nn.Module, params: Optional[Iterable[ParamSpec]] = None):
        self.module = module
        self._layers = _find_layers(module, params)
        named = dict(module.named_parameters())
        names = [n for layer in self._layers for n in (layer.weight, layer.bias, layer.lambda_b, layer.lambda_d)
                 if n is not None]
        self._params: Dict[str, nn.Parameter] = {n: named[n] for n in names}
        self.fisher: Dict[str, torch.Tensor] = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self._params.items()
        }
        self.samples_seen = 0
        self._tracking = False

    def __repr__(self) -> str:
        elements = sum(f.numel() for f in self.fisher.values())
        return (f"FisherAccumulator(layers={len(self._layers)}, params={len(self.fisher)}, "
                f"elements={elements}, samples_seen={self.samples_seen})")

    # -- accumulation ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def track(self, num_samples: int, *, loss_scale: float = 1.0,
              evals_per_sample: Optional[int] = None) -> Iterator["FisherAccumulator"]:
        """Add the per-sample Fisher of the backward passes run inside the block (see the class doc).

        Hooks are removed and saved inputs released when the block exits, also on an exception; after
        an exception `fisher` may hold part of this track and `samples_seen` is not advanced.
        """
        for name, value in (("num_samples", num_samples), ("evals_per_sample", evals_per_sample)):
            if value is None and name == "evals_per_sample":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (math.isfinite(loss_scale) and loss_scale != 0):
            raise ValueError(f"loss_scale must be finite and non-zero, got {loss_scale}")
        if self._tracking:
            raise RuntimeError("FisherAccumulator.track is already active; tracks do not nest")
        state = _Track(num_samples, 1.0 / loss_scale, evals_per_sample,
                       {id(layer): _LayerTrack() for layer in self._layers})
        self._tracking = True
        try:
            for layer in self._layers:
                hook = partial(self._on_forward, state, layer)
                state.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
            yield self
            for layer in self._layers:  # samples whose rows did not all arrive: square what came
                layer_state = state.layers[id(layer)]
                for piece in layer_state.partial.values():
                    self._fold_partial(layer, piece)
                layer_state.partial.clear()
            if state.received == 0:
                warnings.warn("FisherAccumulator.track: no tracked layer received a gradient inside the block; "
                              "run the forward with grad enabled and call backward() inside `with acc.track(...)`",
                              RuntimeWarning, stacklevel=3)
            self.samples_seen += num_samples
        finally:
            for handle in state.handles:
                handle.remove()
            for call in state.calls:
                call.input = None
            state.calls.clear()
            state.layers.clear()
            self._tracking = False

    def _on_forward(self, state: _Track, layer: _Layer, module, args, kwargs, output) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if torch._C._current_graph_task_id() != -1:
            raise RuntimeError(f"FisherAccumulator: layer {layer.name!r} ran during a backward pass (activation "
                               "checkpointing?); disable gradient checkpointing while tracking the Fisher")
        if layer.vera is not None and not _vera_active(module, layer.vera):
            return  # the adapter took no part in this forward (disabled, merged, inactive): no gradient reaches it
        layer_state = state.layers[id(layer)]
        if layer_state.rows_per_sample is not None and state.evals_per_sample is None:
            raise RuntimeError(
                f"FisherAccumulator: layer {layer.name!r} ran again after its gradient arrived in this track; "
                "when forward and backward passes interleave, pass track(..., evals_per_sample=...) so the "
                "rows of each sample are known in advance (or use one track per chunk of whole samples)"
            )
        x = args[0] if args else kwargs["input" if "input" in kwargs else "x"]  # nn.Linear's name, peft's
        if isinstance(module, nn.Conv2d):  # (B, C, H, W) -> (B, positions, C kh kw): a linear map per position
            x = torch.nn.functional.unfold(x.detach(), module.kernel_size, module.dilation, module.padding,
                                           module.stride).transpose(1, 2)
        width = x.shape[-1]
        rows = x.numel() // width if width else 0
        if rows == 0:
            return
        call = _Call(x.detach().reshape(rows, width), layer_state.rows, rows,
                     rows // x.shape[0] if x.dim() > 1 and x.shape[0] else 1)
        layer_state.rows += rows
        state.calls.append(call)
        state.handles.append(output.register_hook(partial(self._on_grad, state, layer, call)))

    def _rows_per_sample(self, state: _Track, layer: _Layer, layer_state: _LayerTrack, call: _Call) -> int:
        """R, this layer's rows per sample: given by evals_per_sample, else all its rows / N (fixed from here on)."""
        n = state.num_samples
        if state.evals_per_sample is not None:
            per_sample = state.evals_per_sample * call.rows_per_eval
            if layer_state.rows_per_sample not in (None, per_sample):
                raise ValueError(f"FisherAccumulator: layer {layer.name!r} has {call.rows_per_eval} rows per model "
                                 f"evaluation in this call but {layer_state.rows_per_sample // state.evals_per_sample} "
                                 "in an earlier one")
            layer_state.rows_per_sample = per_sample
        elif layer_state.rows_per_sample is None:
            if layer_state.rows % n:
                raise ValueError(
                    f"FisherAccumulator: layer {layer.name!r} got {layer_state.rows} input rows in this track (last "
                    f"input {call.rows} x {call.input.shape[-1]}), not divisible by num_samples={n}; every sample "
                    "must bring the same number of rows, sample-major"
                )
            layer_state.rows_per_sample = layer_state.rows // n
        per_sample = layer_state.rows_per_sample
        if call.offset + call.rows > n * per_sample:
            raise ValueError(f"FisherAccumulator: layer {layer.name!r} got more than num_samples={n} x "
                             f"{per_sample} rows per sample in this track")
        return per_sample

    def _on_grad(self, state: _Track, layer: _Layer, call: _Call, grad: torch.Tensor) -> None:
        if call.input is None:
            raise RuntimeError(f"FisherAccumulator: the output of layer {layer.name!r} received a gradient twice in "
                               "one track; backpropagate each graph once inside a track")
        layer_state = state.layers[id(layer)]
        per_sample = self._rows_per_sample(state, layer, layer_state, call)
        x, call.input = call.input, None
        # Gradients stay as they arrive: 1/loss_scale is applied as loss_scale**-2 to the float32 squares.
        # Scaling fp16 gradients by 1/loss_scale (2**-16 under a GradScaler) would flush small entries
        # to zero before they are ever squared.
        if isinstance(layer.module, nn.Conv2d):  # (B, O, H', W') -> rows of positions, as the input's
            grad = grad.flatten(2).transpose(1, 2)
        g = grad.detach().reshape(call.rows, grad.shape[-1])
        if g.dtype != x.dtype:
            common = torch.promote_types(g.dtype, x.dtype)
            g, x = g.to(common), x.to(common)
        state.received += 1
        terms = _row_terms(layer, g, x)
        # Rows [0, head) finish a sample begun in an earlier call, [head, tail) are whole samples,
        # [tail, rows) begin a sample that a later call finishes.
        offset, rows = call.offset, call.rows
        head = min(rows, -offset % per_sample)
        tail = head + (rows - head) // per_sample * per_sample
        scale2 = state.grad_scale ** 2
        if head:
            self._add_piece(layer, layer_state, offset // per_sample, g, x, terms, slice(0, head), per_sample, scale2)
        if tail > head:
            if layer.weight is not None:
                whole_g = g[head:tail].view(-1, per_sample, g.shape[-1])
                whole_x = x[head:tail].view(-1, per_sample, x.shape[-1])
                target = self.fisher[layer.weight].view(whole_g.shape[-1], whole_x.shape[-1])
                if scale2 == 1.0:
                    fisher_accumulate_(target, whole_g, whole_x)
                else:
                    target.add_(fisher_accumulate_(torch.zeros_like(target), whole_g, whole_x), alpha=scale2)
            for name, term in terms.items():  # sample n's gradient: the sum of its rows' terms
                whole = term[head:tail].view(-1, per_sample, term.shape[-1])
                self.fisher[name].add_(whole.sum(1).square().sum(0), alpha=scale2)
        if tail < rows:
            self._add_piece(layer, layer_state, (offset + tail) // per_sample, g, x, terms, slice(tail, rows),
                            per_sample, scale2)

    def _add_piece(self, layer: _Layer, layer_state: _LayerTrack, sample: int, g: torch.Tensor, x: torch.Tensor,
                   terms: Dict[str, torch.Tensor], part: slice, per_sample: int, scale2: float) -> None:
        """Add rows `part` of one call, a piece of `sample`, to that sample's partial gradient; square it once whole."""
        piece = layer_state.partial.setdefault(sample, _Partial(scale2=scale2))
        if layer.weight is not None:
            w = _wide(g[part]).t() @ _wide(x[part])
            piece.weight = w if piece.weight is None else piece.weight.add_(w)
        for name, term in terms.items():
            total = term[part].sum(0)
            piece.sums[name] = piece.sums[name].add_(total) if name in piece.sums else total
        piece.rows += part.stop - part.start
        if piece.rows == per_sample:
            self._fold_partial(layer, layer_state.partial.pop(sample))

    def _fold_partial(self, layer: _Layer, piece: _Partial) -> None:
        if piece.weight is not None:
            target = self.fisher[layer.weight]
            target.add_(piece.weight.square().view_as(target), alpha=piece.scale2)
        for name, total in piece.sums.items():
            self.fisher[name].add_(total.square(), alpha=piece.scale2)

    # -- online EWC ----------------------------------------------------------------------------------

    def reset(self) -> "FisherAccumulator":
        """Zero every Fisher buffer and the sample count."""
        torch._foreach_zero_(list(self.fisher.values()))
        self.samples_seen = 0
        return self

    def decay_(self, gamma: float) -> "FisherAccumulator":
        """F <- gamma * F for every buffer (online EWC merges tasks as F <- gamma F + F_new)."""
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
        torch._foreach_mul_(list(self.fisher.values()), float(gamma))
        return self

    def snapshot(self) -> Dict[str, torch.Tensor]:
        """Detached copies of the tracked parameters: the anchor theta* for `penalty`."""
        return {n: p.detach().clone() for n, p in self._params.items()}

    def penalty(self, anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """1/2 sum F (theta - anchor)**2 over the tracked parameters (scalar float32, differentiable in theta).

        `anchor` maps every tracked name to theta* (e.g. `acc.snapshot()` at the end of the last task);
        multiply by the EWC strength lambda yourself.
        """
        names = list(self.fisher)
        missing = [n for n in names if n not in anchor]
        if missing:
            raise ValueError(f"anchor lacks {len(missing)} tracked parameter(s), e.g. {missing[0]!r}")
        anchors = []
        for n in names:
            a = anchor[n]
            if tuple(a.shape) != tuple(self._params[n].shape):
                raise ValueError(f"anchor[{n!r}] has shape {tuple(a.shape)}, expected {tuple(self._params[n].shape)}")
            anchors.append(a.detach().to(device=self._params[n].device, dtype=torch.float32))
        params = [p.float() for p in self._params.values()]
        diff = torch._foreach_sub(params, anchors)
        weighted = torch._foreach_mul(torch._foreach_mul(diff, diff), list(self.fisher.values()))
        return 0.5 * torch.cat([w.reshape(-1) for w in weighted]).sum()

    def all_reduce_(self, group=None) -> "FisherAccumulator":
        """Sum the Fisher over torch.distributed ranks (one collective per device); no-op when not initialised.

        `samples_seen` stays this process's count.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for f in self.fisher.values():
            by_device.setdefault(f.device, []).append(f)
        for buffers in by_device.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.all_reduce(flat, group=group)
            pieces = [p.view_as(b) for p, b in zip(flat.split([b.numel() for b in buffers]), buffers)]
            torch._foreach_copy_(buffers, pieces)
        return self

    # -- persistence ---------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """{parameter name: Fisher buffer} (the live buffers, like nn.Module.state_dict)."""
        return dict(self.fisher)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> "FisherAccumulator":
        """Copy Fisher buffers in; with `strict`, the names must match the tracked parameters exactly."""
        missing = [n for n in self.fisher if n not in state]
        unexpected = [n for n in state if n not in self.fisher]
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for n, f in self.fisher.items():
            if n not in state:
                continue
            if tuple(state[n].shape) != tuple(f.shape):
                raise ValueError(f"load_state_dict: {n!r} has shape {tuple(state[n].shape)}, expected {tuple(f.shape)}")
            f.copy_(state[n])
        return self

    def save(self, path: str) -> None:
        """Write the Fisher to a safetensors file (names as in `module.named_parameters()`)."""
        from safetensors.torch import save_file

        tensors = {n: f.detach().cpu().contiguous() for n, f in self.fisher.items()}
        save_file(tensors, path, metadata={"format": "dcfast.engine.fisher", "samples_seen": str(self.samples_seen)})

    def load(self, path: str, strict: bool = True) -> "FisherAccumulator":
        """Read a Fisher written by `save` into this accumulator's buffers."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            state = {n: handle.get_tensor(n) for n in handle.keys()}
            metadata = handle.metadata() or {}
        self.load_state_dict(state, strict=strict)
        self.samples_seen = int(metadata.get("samples_seen", 0))
        return self


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for the sums of 16/32-bit gradients, float64 kept as is."""
    return t if t.dtype == torch.float64 else t.float()


def _trackable(module: nn.Module) -> bool:
    """An nn.Linear, or an nn.Conv2d whose per-sample gradient is the unfolded product (no groups, zero padding)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


def vera_projections(layer: nn.Module, adapter: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A peft VeRA layer's shared frozen matrices as its forward uses them: A_s = A[:, :in] (r, in) and
    B_s = B[:out, :] (out, r), sliced from the pair sized for the largest target layer."""
    return layer.vera_A[adapter][:, :layer.in_features], layer.vera_B[adapter][:layer.out_features, :]


def _is_vera_layer(module: nn.Module) -> bool:
    """A peft VeRA layer: trained vectors vera_lambda_b / vera_lambda_d per adapter and the shared vera_A / vera_B."""
    return isinstance(getattr(module, "vera_lambda_b", None), nn.ParameterDict) and \
        getattr(module, "vera_A", None) is not None


def _vera_active(module: nn.Module, adapter: str) -> bool:
    """Whether a VeRA layer's forward adds `adapter`'s term (not disabled, not merged, among its active adapters)."""
    return not module.disable_adapters and not module.merged and adapter in module.active_adapters


def _row_terms(layer: _Layer, g: torch.Tensor, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-row gradient terms (rows, size) of the tracked parameters whose per-sample gradient is the sum of its rows'
    terms: an nn.Linear's bias (the output gradient G), a VeRA layer's lambda_b (G * B_s (lambda_d * u)) and lambda_d
    (u * B_s^T (lambda_b * G)), u = A_s x; in float32 (float64 kept)."""
    terms = {}
    if layer.bias is not None:
        terms[layer.bias] = _wide(g)
    if layer.vera is not None:
        module, adapter = layer.module, layer.vera
        g, x = _wide(g), _wide(x)
        a, b = (m.to(g) for m in vera_projections(module, adapter))
        u = x @ a.t()
        if layer.lambda_b is not None:
            terms[layer.lambda_b] = g * ((u * module.vera_lambda_d[adapter].detach().to(g)) @ b.t())
        if layer.lambda_d is not None:
            terms[layer.lambda_d] = u * ((g * module.vera_lambda_b[adapter].detach().to(g)) @ b)
    return terms


def _is_adapter(name: str) -> bool:
    """A module or parameter name under a peft LoRA factor (`lora_A` / `lora_B`) or a VeRA vector."""
    parts = name.split(".")
    return any(part in parts for part in ("lora_A", "lora_B", "vera_lambda_b", "vera_lambda_d"))


def _find_layers(module: nn.Module, params: Optional[Iterable[ParamSpec]]) -> List[_Layer]:
    """The nn.Linear / nn.Conv2d / VeRA layers to hook and which of their parameters to track, in module order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    named = dict(module.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    # parameter name -> (layer name, layer, its _Layer field, VeRA adapter or None)
    owners: Dict[str, Tuple[str, nn.Module, str, Optional[str]]] = {}
    for layer_name, sub in module.named_modules():
        if _trackable(sub):
            found = [(attr, getattr(sub, attr), None) for attr in ("weight", "bias")]
        elif _is_vera_layer(sub):
            found = [(field_name, vectors[adapter], adapter)
                     for field_name, vectors in (("lambda_b", sub.vera_lambda_b), ("lambda_d", sub.vera_lambda_d))
                     for adapter in vectors]
        else:
            continue
        for attr, p, adapter in found:
            if p is None or id(p) not in name_of:
                continue
            pname = name_of[id(p)]
            if pname in owners:
                raise ValueError(f"parameter {pname!r} is shared by layers {owners[pname][0]!r} and "
                                 f"{layer_name!r}; tied weights are not supported")
            owners[pname] = (layer_name, sub, attr, adapter)

    if params is None:
        adapters = [n for n, o in owners.items() if _is_adapter(o[0]) or o[3] is not None]
        if not adapters:
            raise ValueError(
                f"FisherAccumulator: {type(module).__name__} has no peft LoRA layers (nn.Linear under lora_A / "
                "lora_B) nor VeRA layers; add an adapter first (e.g. unet.add_adapter(LoraConfig(r=4, "
                "target_modules=[...]))) or pass params= with the nn.Linear parameters to track"
            )
        chosen = [n for n in adapters if named[n].requires_grad]
        uncovered = sorted({n.rsplit(".", 1)[0] for n, p in named.items()
                            if p.requires_grad and n not in owners and _is_adapter(n)})
        if uncovered:  # a penalty over the tracked factors alone would leave these unprotected, silently
            raise ValueError(
                f"FisherAccumulator: {len(uncovered)} trainable LoRA factor(s) are neither nn.Linear nor a plain "
                f"nn.Conv2d (e.g. {uncovered[0]!r}: grouped, or padded other than with zeros); the per-sample "
                "Fisher covers those two only. Target other layers, or pass params= to track a subset knowingly")
        if not chosen:
            raise ValueError(f"FisherAccumulator: {type(module).__name__} has {len(adapters)} LoRA nn.Linear (or VeRA) "
                             "parameters but none requires grad; unfreeze the adapter or pass params=")
    else:
        if isinstance(params, (str, torch.Tensor)):
            raise TypeError("params must be an iterable of parameter names or parameters, not a single one")
        chosen = []
        for spec in params:
            if isinstance(spec, str):
                if spec not in named:
                    raise ValueError(f"params: {spec!r} is not a parameter name of {type(module).__name__}")
                chosen.append(spec)
            elif isinstance(spec, torch.Tensor) and id(spec) in name_of:
                chosen.append(name_of[id(spec)])
            else:
                raise TypeError(f"params: expected parameter names or parameters of the module, got {type(spec).__name__}")
        if not chosen:
            raise ValueError("FisherAccumulator: params is empty; pass at least one trainable layer parameter")
        for n in chosen:
            if n not in owners:
                raise ValueError(f"params: {n!r} (shape {tuple(named[n].shape)}) is not the weight or bias of an "
                                 "nn.Linear or a plain nn.Conv2d, nor a peft VeRA vector, the parameters the "
                                 "per-sample Fisher is defined for")
            if not named[n].requires_grad:
                raise ValueError(f"params: {n!r} does not require grad, so no backward pass reaches it")

    layers: Dict[int, _Layer] = {}
    for n in dict.fromkeys(chosen):
        layer_name, sub, attr, adapter = owners[n]
        layer = layers.setdefault(id(sub), _Layer(layer_name, sub))
        if adapter is not None:
            if layer.vera not in (None, adapter):
                raise ValueError(f"params: VeRA layer {layer_name!r} has tracked vectors of adapters {layer.vera!r} "
                                 f"and {adapter!r}; track one VeRA adapter per layer")
            if not isinstance(sub.vera_dropout[adapter], nn.Identity):
                raise ValueError(f"FisherAccumulator: VeRA layer {layer_name!r} applies dropout, whose random mask "
                                 "the per-sample Fisher cannot recompute from the layer's input; use vera_dropout=0")
            layer.vera = adapter
        setattr(layer, attr, n)
    return list(layers.values())
