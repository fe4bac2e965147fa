"""The DC score engine against the naive loop it replaces (dcfast.engine.reference.dc_scores_naive)."""
import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import dcfast
from dcfast.engine.reference import dc_scores_naive
from dcfast.engine.targets import default_timesteps

B, K, T, C, S = 2, 3, 2, 4, 16


@pytest.fixture(scope="module")
def lora_unet(unet):
    wrapped = copy.deepcopy(unet)
    wrapped.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return wrapped.eval()


def _problem(seed=0, per_image_timesteps=False, shared_noise=False):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, S, S, generator=g)
    cond = torch.randn(K, 5, 32, generator=g)
    timesteps = torch.randint(0, 1000, (B, T) if per_image_timesteps else (T,), generator=g)
    noise = torch.randn((T, C, S, S) if shared_noise else (B, T, C, S, S), generator=g)
    return x0, cond, timesteps, noise


CASES = {
    "shared-t-unchunked": dict(kwargs=dict(), max_batch=None),
    "shared-t-chunk5": dict(kwargs=dict(), max_batch=5),
    "per-image-t-chunk4": dict(kwargs=dict(per_image_timesteps=True), max_batch=4),
    "shared-noise-chunk1": dict(kwargs=dict(shared_noise=True), max_batch=1),
}


@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_engine_matches_naive_loop(unet, lora_unet, scheduler, case, with_lora):
    model = lora_unet if with_lora else unet
    x0, cond, timesteps, noise = _problem(**CASES[case]["kwargs"])
    with torch.no_grad():
        fused = dcfast.dc_scores(model, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                                 max_batch=CASES[case]["max_batch"])
        naive = dc_scores_naive(model, scheduler, x0, cond, timesteps=timesteps, noise=noise)
    assert fused.shape == (B, K, T)
    assert (fused - naive).abs().max() <= 1e-5 * naive.abs().max()


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_engine_losses_match_naive_loop(unet, scheduler, loss):
    x0, cond, timesteps, noise = _problem(seed=1)
    with torch.no_grad():
        fused = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, loss=loss,
                                 huber_delta=0.5, max_batch=7)
        naive = dc_scores_naive(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, loss=loss,
                                huber_delta=0.5)
    assert (fused - naive).abs().max() <= 1e-5 * naive.abs().max()


def test_default_timesteps_and_generator_reproducible(unet, scheduler):
    assert default_timesteps(1000, 8).tolist() == list(range(62, 1000, 125))
    x0, cond, _, _ = _problem()
    with torch.no_grad():
        first = dcfast.dc_scores(unet, scheduler, x0, cond, num_timesteps=3, generator=torch.Generator().manual_seed(3))
        again = dcfast.dc_scores(unet, scheduler, x0, cond, num_timesteps=3, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(B, 3, C, S, S, generator=torch.Generator().manual_seed(3))
        naive = dc_scores_naive(unet, scheduler, x0, cond, timesteps=default_timesteps(1000, 3), noise=noise)
    assert torch.equal(first, again)
    assert (first - naive).abs().max() <= 1e-5 * naive.abs().max()


def test_engine_under_autocast_compares_in_the_noise_dtype(unet, scheduler):
    x0, cond, timesteps, noise = _problem(seed=5)
    with torch.no_grad():
        exact = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() <= 0.05 * exact.abs().max()


def _ce_loss(err):
    labels = torch.arange(err.shape[0]) % err.shape[1]
    return F.cross_entropy(dcfast.dc_logits(err, temperature=0.1), labels)


def _grads(module, *extra):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None] +
                     [t.grad.flatten() for t in extra])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_grad_mode_matches_naive_loop(lora_unet, scheduler):
    x0, cond, timesteps, noise = _problem(seed=2)
    lora_unet.zero_grad()
    _ce_loss(dcfast.dc_scores(lora_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=5)).backward()
    fused = _grads(lora_unet)
    lora_unet.zero_grad()
    _ce_loss(dc_scores_naive(lora_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)).backward()
    naive = _grads(lora_unet)
    lora_unet.zero_grad()
    assert fused.abs().sum() > 0
    assert _rel(fused, naive) <= 1e-5


@pytest.mark.parametrize("max_batch", [1, 5, 12], ids=["chunk1", "chunk5", "chunk-all"])
def test_memory_bounded_gradient_equals_unchunked(lora_unet, scheduler, max_batch):
    x0, cond, timesteps, noise = _problem(seed=4)
    # x0 and cond get gradients through a small graph, as modifier-token embeddings do in training.
    x0_param = x0.clone().requires_grad_(True)
    cond_param = cond.clone().requires_grad_(True)

    lora_unet.zero_grad()
    loss = _ce_loss(dcfast.dc_scores(lora_unet, scheduler, x0_param * 1.0, cond_param * 1.0,
                                     timesteps=timesteps, noise=noise, max_batch=B * K * T))
    loss.backward()
    expected = _grads(lora_unet, x0_param, cond_param)

    x0_param.grad = cond_param.grad = None
    lora_unet.zero_grad()
    value, err = dcfast.dc_loss_backward(lora_unet, scheduler, x0_param * 1.0, cond_param * 1.0, _ce_loss,
                                         timesteps=timesteps, noise=noise, max_batch=max_batch)
    got = _grads(lora_unet, x0_param, cond_param)
    lora_unet.zero_grad()
    assert err.shape == (B, K, T) and not err.requires_grad
    assert abs(value.item() - loss.item()) <= 1e-6 * max(1.0, abs(loss.item()))
    assert _rel(got, expected) <= 1e-5


class _ChannelsLast(torch.nn.Module):
    """The U-Net, returning channels_last outputs as a channels_last U-Net does (no `.view` of those)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)[0]
        return (out.contiguous(memory_format=torch.channels_last),)


@pytest.mark.parametrize("max_batch", [None, 5], ids=["unchunked", "chunk5"])
def test_channels_last_unet(lora_unet, scheduler, max_batch):
    x0, cond, timesteps, noise = _problem(seed=6)
    wrapped = _ChannelsLast(lora_unet)
    # The wrapper is no UNet2DConditionModel, so it runs the plain per-row pass: compare with that pass (share=()).
    with torch.no_grad():
        plain = dcfast.dc_scores(lora_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=max_batch,
                                 share=())
        last = dcfast.dc_scores(wrapped, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=max_batch)
    assert torch.equal(last, plain)
    grads = []
    for model in (lora_unet, wrapped):
        lora_unet.zero_grad()
        dcfast.dc_loss_backward(model, scheduler, x0, cond, _ce_loss, timesteps=timesteps, noise=noise, max_batch=5,
                                share=())
        grads.append(_grads(lora_unet))
    lora_unet.zero_grad()
    assert _rel(grads[1], grads[0]) <= 1e-6


class _CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Elements written by the engine's copying ops (cat, dtype casts, copy_, clone) outside the U-Net."""

    COPIES = ("aten.cat", "aten._to_copy", "aten.copy_", "aten.clone")

    def __init__(self):
        super().__init__()
        self.written, self.paused = {}, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if not self.paused and name in self.COPIES and isinstance(out, torch.Tensor):
            self.written[name] = self.written.get(name, 0) + out.numel()
        return out


class _Paused(torch.nn.Module):
    def __init__(self, unet, counter):
        super().__init__()
        self.unet, self.config, self.counter = unet, unet.config, counter

    def forward(self, *args, **kwargs):
        self.counter.paused = True
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.counter.paused = False


@pytest.mark.parametrize("max_batch", [None, 5], ids=["unchunked", "chunk5"])
def test_predictions_are_copied_once_under_autocast(unet, scheduler, max_batch):
    """Under autocast the U-Net returns bf16 rows and the noise is fp32: the engine casts each chunk once,
    into one buffer (B*K*T*D elements written in all), instead of torch.cat and then a full-size cast."""
    x0, cond, timesteps, noise = _problem(seed=7)
    counter = _CopyCounter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with counter:
            dcfast.dc_scores(_Paused(unet, counter), scheduler, x0, cond, timesteps=timesteps, noise=noise,
                             max_batch=max_batch)
    assert "aten.cat" not in counter.written
    assert sum(counter.written.values()) <= B * K * T * C * S * S + noise.numel(), counter.written


def test_logits_weights_and_temperature():
    err = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    assert torch.allclose(dcfast.dc_logits(err), torch.tensor([[-2.0, -2.0]]))
    assert torch.allclose(dcfast.dc_logits(err, temperature=0.5, weights=torch.tensor([2.0, 0.0])),
                          torch.tensor([[-2.0, -4.0]]))


def _bad(unet, scheduler, overrides):
    x0, cond, timesteps, noise = _problem()
    args = dict(unet=unet, scheduler=scheduler, x0=x0, cond=cond, timesteps=timesteps, noise=noise)
    args.update(overrides)
    return dcfast.dc_scores(args.pop("unet"), args.pop("scheduler"), args.pop("x0"), args.pop("cond"), **args)


BAD_INPUTS = {
    "x0-3d": (dict(x0=torch.randn(C, S, S)), ValueError, "x0 must be a (B, C, H, W)"),
    "x0-channels": (dict(x0=torch.randn(B, 3, S, S)), ValueError, "in_channels=4"),
    "no-concepts": (dict(cond=torch.randn(0, 5, 32)), ValueError, "K=0"),
    "cond-dim": (dict(cond=torch.randn(K, 5, 16)), ValueError, "cross_attention_dim is 32"),
    "cond-dtype": (dict(cond=torch.randn(K, 5, 32, dtype=torch.float64)), ValueError, "cond (torch.float64"),
    "noise-shape": (dict(noise=torch.randn(B, T + 1, C, S, S)), ValueError, "noise must be (B, T, C, H, W)"),
    "timesteps-float": (dict(timesteps=torch.tensor([0.5, 1.5])), ValueError, "integer (T,) or (B, T)"),
    "timesteps-range": (dict(timesteps=torch.tensor([0, 1000])), ValueError, "timesteps must lie in [0, 1000)"),
    "timesteps-batch": (dict(timesteps=torch.zeros(B + 1, T, dtype=torch.long)), ValueError, "(B, T) with B=2"),
    "scheduler": (dict(scheduler=SimpleNamespace(config=None)), TypeError, "alphas_cumprod"),
    "loss": (dict(loss="l3"), ValueError, "loss must be one of"),
    "max-batch": (dict(max_batch=0), ValueError, "max_batch must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(unet, scheduler, case):
    overrides, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=re.escape(message)):
        with torch.no_grad():
            _bad(unet, scheduler, overrides)
