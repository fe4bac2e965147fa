"""FisherAccumulator on peft VeRA adapters against the loop it replaces, `dcfast.engine.reference.fisher_naive`
(one backward per sample): the trained vectors lambda_b and lambda_d of a tiny U-Net whose target layers have
different shapes (the shared A and B are sliced per layer), from one backward pass.

Relative error: per parameter, ||F - F_ref|| / ||F_ref|| and max |F - F_ref| / max |F_ref|, so a bound is relative
to the scale of that parameter's terms, never to the largest Fisher of the model.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import VeraConfig
from peft.tuners.vera import VeraModel

from dcfast.engine.fisher import FisherAccumulator, vera_projections
from dcfast.engine.reference import fisher_naive
from dcfast.models.tiny import tiny_scheduler, tiny_unet

SIZE, TOKENS, RANK = 8, 5, 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ALPHAS = tiny_scheduler().alphas_cumprod


def vera_unet(dtype=torch.float32, dropout=0.0):
    """The tiny U-Net with VeRA on the attention projections (32- and 64-wide layers: A, B sliced per layer); both
    vectors drawn non-zero (peft starts lambda_b at zero, which would make every lambda_d gradient zero), at 0.1
    scale: at scale 1 the float32 U-Net itself is so ill-conditioned that its own per-sample loop is 3e-4 off."""
    unet = tiny_unet(seed=0, sample_size=SIZE)
    unet.requires_grad_(False)
    VeraModel(unet, VeraConfig(r=RANK, target_modules=TARGETS, projection_prng_key=5, vera_dropout=dropout), "default")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".vera_lambda_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet.to(dtype)


def vectors(unet):
    return [n for n, p in unet.named_parameters() if ".vera_lambda_" in n]


# float32: the hook sums its per-sample products in another order than autograd's backward, and each vector entry's
# gradient is a sum over tokens of terms of both signs, so the rounding is relative to the terms, not to the sum:
# 1.02e-5 of an entry's scale was seen under ATEN_CPU_CAPABILITY=default (1e-6 on avx512). Float64 checks exactness.
FLOAT32_TOL = 5e-5


def assert_close_per_parameter(got, want, tol):
    """Each parameter's Fisher within `tol` of the reference, relative to that parameter's own scale; and no
    reference is zero (a zero gradient would make the comparison empty)."""
    assert set(got) == set(want)
    for name, ref in want.items():
        ref, diff = ref.double(), got[name].double() - ref.double()
        assert ref.abs().max() > 0, f"{name}: the reference Fisher is zero"
        assert (diff.norm() / ref.norm()).item() <= tol, name
        assert (diff.abs().max() / ref.abs().max()).item() <= tol, name


def denoise_losses(forward, x0, noise, t, text):
    """Per-sample denoising loss (B,): ||eps - eps_theta(x_t, c, t)||^2 averaged over (C, H, W)."""
    a = ALPHAS.to(x0.dtype)[t].view(-1, 1, 1, 1)
    pred = forward(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample
    return (pred - noise).square().mean((1, 2, 3))


def denoise_problem(n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, SIZE, SIZE, generator=gen).to(dtype), torch.randn(n, 4, SIZE, SIZE, generator=gen).to(dtype),
            torch.randint(0, 1000, (n,), generator=gen), torch.randn(n, TOKENS, 32, generator=gen).to(dtype))


def naive(model, losses_fn, samples, params):
    n = samples[0].shape[0]
    return fisher_naive(model, lambda i: losses_fn(model, *(s[i:i + 1] for s in samples)).sum(), n, params)


@pytest.fixture(scope="module")
def unet():
    return vera_unet()


@pytest.fixture(scope="module")
def denoise(unet):
    samples = denoise_problem(3)
    return samples, naive(unet, denoise_losses, samples, vectors(unet))


def test_default_tracks_every_vera_vector_and_nothing_else(unet):
    acc = FisherAccumulator(unet)
    assert list(acc.fisher) == vectors(unet) and len(acc.fisher) == 2 * 48
    assert all(".vera_lambda_b." in n or ".vera_lambda_d." in n for n in acc.fisher)
    named = dict(unet.named_parameters())
    assert all(acc.fisher[n].shape == named[n].shape and acc.fisher[n].dtype == torch.float32 for n in acc.fisher)
    # the shared matrices are buffers sized for the widest layer, sliced for the narrower ones
    layers = {n: m for n, m in unet.named_modules() if hasattr(m, "vera_lambda_d")}
    full_a = next(iter(layers.values())).vera_A["default"]
    assert {vera_projections(m, "default")[0].shape[1] for m in layers.values()} == {32, 64} == {32, full_a.shape[1]}


def test_denoising_matches_the_per_sample_loop(unet, denoise):
    samples, want = denoise
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=3):
        denoise_losses(unet, *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert_close_per_parameter(acc.fisher, want, FLOAT32_TOL)
    assert acc.samples_seen == 3


def test_float64_is_exact():
    """With the model in float64 the only rounding left is the float32 Fisher buffer."""
    unet = vera_unet(torch.float64)
    samples = denoise_problem(2, torch.float64)
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        denoise_losses(unet, *samples).sum().backward()
    assert_close_per_parameter(acc.fisher, naive(unet, denoise_losses, samples, vectors(unet)), 1e-6)


def test_not_the_square_of_the_batch_gradient(unet, denoise):
    samples, want = denoise
    names = list(want)
    named = dict(unet.named_parameters())
    grads = torch.autograd.grad(denoise_losses(unet, *samples).sum(), [named[n] for n in names])
    squared = torch.cat([g.double().square().reshape(-1) for g in grads])
    reference = torch.cat([want[n].reshape(-1) for n in names])
    assert ((squared - reference).norm() / reference.norm()).item() > 0.1


def test_mean_reduced_loss_and_a_subset(unet, denoise):
    """loss_scale undoes a mean; params= tracks lambda_b alone, with the same values as the full track."""
    samples, want = denoise
    only_b = [n for n in want if ".vera_lambda_b." in n]
    acc = FisherAccumulator(unet, params=only_b)
    with acc.track(num_samples=3, loss_scale=1 / 3):
        denoise_losses(unet, *samples).mean().backward()
    unet.zero_grad(set_to_none=True)
    assert list(acc.fisher) == only_b
    assert_close_per_parameter(acc.fisher, {n: want[n] for n in only_b}, FLOAT32_TOL)


# -- the DC loss: K*T U-Net rows per image, chunks that split images -------------------------------

K, T = 2, 3


def dc_losses(forward, x0, noise, label, concepts, timesteps):
    """Per-image DC cross-entropy (B,) over K concepts and T (t, eps) pairs, rows image-major (b, k, t)."""
    B = x0.shape[0]
    a = ALPHAS.to(x0.dtype)[timesteps].view(1, 1, T, 1, 1, 1)
    x_t = a.sqrt() * x0[:, None, None] + (1 - a).sqrt() * noise[:, None]
    x_t = x_t.expand(B, K, T, *x0.shape[1:]).reshape(B * K * T, *x0.shape[1:])
    text = concepts[None, :, None].expand(B, K, T, *concepts.shape[1:]).reshape(B * K * T, *concepts.shape[1:])
    pred = forward(x_t, timesteps.repeat(B * K), encoder_hidden_states=text).sample.view(B, K, T, -1)
    err = (pred - noise[:, None].flatten(3)).square().mean(-1)
    return F.cross_entropy(-err.mean(-1), label, reduction="none")


def chunked(unet, chunk):
    """A forward that runs the U-Net batch in consecutive chunks of `chunk` rows, in one graph."""

    def forward(x, t, encoder_hidden_states):
        outs = [unet(x[i:i + chunk], t[i:i + chunk], encoder_hidden_states=encoder_hidden_states[i:i + chunk]).sample
                for i in range(0, x.shape[0], chunk)]
        return SimpleNamespace(sample=torch.cat(outs))

    return forward


@pytest.mark.parametrize("chunk", [12, 4], ids=["one-call", "chunks-split-images"])
def test_dc_loss_matches_the_per_sample_loop(unet, chunk):
    """K*T = 6 U-Net rows per image; chunks of 4 rows split images, whose pieces are summed before squaring."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, SIZE, SIZE, generator=gen)
    noise = torch.randn(2, T, 4, SIZE, SIZE, generator=gen)
    concepts, timesteps = torch.randn(K, TOKENS, 32, generator=gen), torch.tensor([100, 500, 900])

    def losses(forward, x0, noise, label):
        return dc_losses(forward, x0, noise, label, concepts, timesteps)

    samples = (x0, noise, torch.tensor([0, 1]))
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        losses(chunked(unet, chunk), *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    # a DC gradient sums terms of opposite sign over concepts: float32 rounding is relative to those terms
    assert_close_per_parameter(acc.fisher, naive(unet, losses, samples, vectors(unet)), 1e-4)


# -- what the accumulator must refuse or leave alone -------------------------------------------------


def test_a_disabled_adapter_gets_no_fisher():
    """A VeRA layer whose adapter is disabled adds nothing, so no gradient reaches its vectors: their Fisher stays 0
    even though the layer's output carries a gradient (the input requires one here)."""
    unet = vera_unet()
    layers = [m for m in unet.modules() if hasattr(m, "vera_lambda_d")]
    off = layers[: len(layers) // 2]
    acc = FisherAccumulator(unet)
    for layer in off:
        layer.enable_adapters(False)
    x0, noise, t, text = denoise_problem(2)
    with acc.track(num_samples=2):
        denoise_losses(unet, x0.requires_grad_(), noise, t, text).sum().backward()
    names = {id(p): n for n, p in unet.named_parameters()}
    silent = {names[id(p)] for layer in off for p in (layer.vera_lambda_b["default"], layer.vera_lambda_d["default"])}
    assert all(acc.fisher[n].abs().max() == 0 for n in silent)
    assert all(acc.fisher[n].abs().max() > 0 for n in acc.fisher if n not in silent)


def test_vera_dropout_is_refused():
    """Dropout's random mask cannot be recomputed from the layer's input, so the Fisher would be wrong: refused."""
    with pytest.raises(ValueError, match="applies dropout.*vera_dropout=0"):
        FisherAccumulator(vera_unet(dropout=0.1))


def test_frozen_vectors_are_refused():
    with pytest.raises(ValueError, match="none requires grad"):
        FisherAccumulator(vera_unet().requires_grad_(False))
