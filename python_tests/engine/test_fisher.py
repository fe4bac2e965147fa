"""FisherAccumulator against the loops it replaces: `dcfast.engine.reference.fisher_naive` (one backward per
sample) and `fisher_vmap` (torch.func vmap(grad)), on a tiny U-Net with a peft LoRA adapter and on a
small MLP with biases; plus online-EWC state, persistence, hook hygiene and the errors users get.

Relative error: max over parameters of ||F - F_ref|| / ||F_ref||. fp32 runs differ from the per-sample
loop only by the U-Net's batch-size-dependent rounding; float64 runs show the accumulator itself exact.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

from dcfast.engine.fisher import FisherAccumulator
from dcfast.models.tiny import tiny_scheduler, tiny_unet
from dcfast.engine.reference import fisher_naive, fisher_vmap

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over CPU SDPA
SIZE, TOKENS = 8, 5  # latent side, text tokens
ALPHAS = tiny_scheduler().alphas_cumprod


def rel_err(got, want):
    assert set(got) == set(want)
    return max(((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item() for n in want)


def lora_unet(dtype=torch.float32, target_modules=("to_q", "to_k", "to_v", "to_out.0")):
    """The tiny U-Net with LoRA on the attention projections (or `target_modules`); lora_B drawn non-zero (peft
    starts it at zero, which would make every lora_A gradient zero)."""
    unet = tiny_unet(seed=0, sample_size=SIZE)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(target_modules)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet.to(dtype)


def denoise_losses(forward, x0, noise, t, text):
    """Per-sample denoising loss (B,): ||eps - eps_theta(x_t, c, t)||^2 averaged over (C, H, W)."""
    a = ALPHAS.to(x0.dtype)[t].view(-1, 1, 1, 1)
    pred = forward(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample
    return (pred - noise).square().mean((1, 2, 3))


def denoise_problem(n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, SIZE, SIZE, generator=gen).to(dtype), torch.randn(n, 4, SIZE, SIZE, generator=gen).to(dtype),
            torch.randint(0, 1000, (n,), generator=gen), torch.randn(n, TOKENS, 32, generator=gen).to(dtype))


def naive(model, losses_fn, samples, params=None):
    n = samples[0].shape[0]
    return fisher_naive(model, lambda i: losses_fn(model, *(s[i:i + 1] for s in samples)).sum(), n, params)


@pytest.fixture(scope="module")
def unet():
    return lora_unet()


@pytest.fixture(scope="module")
def denoise(unet):
    """Problem, naive-loop Fisher, vmap Fisher (N = 3)."""
    samples = denoise_problem(3)
    return samples, naive(unet, denoise_losses, samples), fisher_vmap(unet, denoise_losses, samples)


def test_default_tracks_every_lora_factor(unet):
    acc = FisherAccumulator(unet)
    lora = [n for n, p in unet.named_parameters() if "lora_" in n]
    assert list(acc.fisher) == lora and len(lora) == 96
    assert all(acc.fisher[n].dtype == torch.float32 and acc.fisher[n].shape == p.shape
               for n, p in unet.named_parameters() if n in acc.fisher)
    assert "layers=96" in repr(acc)


def test_denoising_matches_naive_and_vmap(unet, denoise):
    samples, want, via_vmap = denoise
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=3):
        denoise_losses(unet, *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, want) <= 1e-5
    assert rel_err(acc.fisher, via_vmap) <= 1e-5
    assert rel_err(via_vmap, want) <= 1e-5  # the two references agree too
    assert acc.samples_seen == 3


def test_float64_is_exact():
    """With the model in float64 the only rounding left is the float32 Fisher buffer."""
    unet = lora_unet(torch.float64)
    samples = denoise_problem(2, torch.float64)
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        denoise_losses(unet, *samples).sum().backward()
    assert rel_err(acc.fisher, naive(unet, denoise_losses, samples)) <= 1e-6


def test_not_the_square_of_the_batch_gradient(unet, denoise):
    """The common EWC bug squares a batch gradient; the accumulator must not agree with it."""
    samples, want, _ = denoise
    batch_grads = torch.autograd.grad(denoise_losses(unet, *samples).sum(), [p for n, p in unet.named_parameters() if n in want])
    assert rel_err({n: g.double().square() for n, g in zip(want, batch_grads)}, want) > 0.1


def test_mean_reduced_loss(unet, denoise):
    samples, want, _ = denoise
    scaled, unscaled = FisherAccumulator(unet), FisherAccumulator(unet)
    with scaled.track(num_samples=3, loss_scale=1 / 3):
        denoise_losses(unet, *samples).mean().backward()
    with unscaled.track(num_samples=3):
        denoise_losses(unet, *samples).mean().backward()
    unet.zero_grad(set_to_none=True)
    assert rel_err(scaled.fisher, want) <= 1e-5
    assert rel_err({n: f * 9 for n, f in unscaled.fisher.items()}, want) <= 1e-5  # N**2 too small without it


def test_tracks_accumulate(unet, denoise):
    """Disjoint chunks of samples in separate tracks add up to the Fisher of all of them."""
    samples, want, _ = denoise
    acc = FisherAccumulator(unet)
    for chunk in (slice(0, 2), slice(2, 3)):
        part = [s[chunk] for s in samples]
        with acc.track(num_samples=part[0].shape[0]):
            denoise_losses(unet, *part).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, want) <= 1e-5 and acc.samples_seen == 3


def test_decay_merges_online(unet, denoise):
    samples, want, _ = denoise
    other = denoise_problem(2, seed=5)
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        denoise_losses(unet, *other).sum().backward()
    acc.decay_(0.25)
    with acc.track(num_samples=3):
        denoise_losses(unet, *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    old = naive(unet, denoise_losses, other)
    assert rel_err(acc.fisher, {n: 0.25 * old[n] + want[n] for n in want}) <= 1e-5
    acc.reset()
    assert acc.samples_seen == 0 and all(f.abs().max() == 0 for f in acc.fisher.values())
    with pytest.raises(ValueError, match="gamma"):
        acc.decay_(-1.0)


def test_untracked_parameters_untouched(unet, denoise):
    """Tracking a subset: only those names get a Fisher, and the model's gradients are the plain backward's."""
    samples, want, _ = denoise
    subset = [n for n in want if ".attn2." in n]
    acc = FisherAccumulator(unet, params=subset)
    assert list(acc.fisher) == subset
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with acc.track(num_samples=3):
        denoise_losses(unet, *samples).sum().backward()
    tracked_grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    denoise_losses(unet, *samples).sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, {n: want[n] for n in subset}) <= 1e-5
    assert set(tracked_grads) == set(plain_grads) == set(want)
    for n in plain_grads:
        torch.testing.assert_close(tracked_grads[n], plain_grads[n])
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]), n


# -- the DC loss: K*T U-Net rows per image -------------------------------------------------------

K, T = 2, 3


def dc_losses(forward, x0, noise, label, concepts, timesteps):
    """Per-image DC cross-entropy (B,): each image's latent repeated K*T times image-major (b, k, t),
    errors (B, K, T), logits -mean_t err, cross-entropy against the image's label."""
    B = x0.shape[0]
    a = ALPHAS.to(x0.dtype)[timesteps].view(1, 1, T, 1, 1, 1)
    x_t = a.sqrt() * x0[:, None, None] + (1 - a).sqrt() * noise[:, None]  # (B, 1, T, C, H, W) -> broadcast K
    x_t = x_t.expand(B, K, T, *x0.shape[1:]).reshape(B * K * T, *x0.shape[1:])
    text = concepts[None, :, None].expand(B, K, T, *concepts.shape[1:]).reshape(B * K * T, *concepts.shape[1:])
    steps = timesteps.repeat(B * K)
    pred = forward(x_t, steps, encoder_hidden_states=text).sample.view(B, K, T, -1)
    err = (pred - noise[:, None].flatten(3)).square().mean(-1)
    return F.cross_entropy(-err.mean(-1), label, reduction="none")


@pytest.fixture(scope="module")
def dc(unet):
    gen = torch.Generator().manual_seed(3)
    n = 2
    x0 = torch.randn(n, 4, SIZE, SIZE, generator=gen)
    noise = torch.randn(n, T, 4, SIZE, SIZE, generator=gen)
    label = torch.tensor([0, 1])
    concepts = torch.randn(K, TOKENS, 32, generator=gen)
    timesteps = torch.tensor([100, 500, 900])

    def losses(forward, x0, noise, label):
        return dc_losses(forward, x0, noise, label, concepts, timesteps)

    samples = (x0, noise, label)
    return losses, samples, naive(unet, losses, samples), fisher_vmap(unet, losses, samples)


def test_dc_loss_with_kt_rows_per_image(unet, dc):
    losses, samples, want, via_vmap = dc
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        losses(unet, *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, want) <= 1e-5  # the naive loop runs each image's rows as one batch, as we do
    # vmap(grad) batches the float32 matmuls its own way, and a DC gradient is a sum over concepts of terms of
    # opposite sign ((p_k - y_k) times d logit_k): its rounding is relative to those terms, not to the sum (seen:
    # 1.06e-5 of the result under ATEN_CPU_CAPABILITY=default), so this cross-check is 10x looser.
    assert rel_err(acc.fisher, via_vmap) <= 1e-4


# The DC loss's gradient is a difference of the concepts' error gradients (they cancel), and chunking changes the
# U-Net's float32 batch shapes: the squared result's relative error reached 1.02e-5 on the avx2 path of an avx512
# CPU (1e-5 held on the other paths).
DC_CHUNKED_TOL = 3e-5


def chunked(unet, chunk):
    """A forward that runs the U-Net batch in consecutive chunks of `chunk` rows, in one graph."""

    def forward(x, t, encoder_hidden_states):
        outs = [unet(x[i:i + chunk], t[i:i + chunk], encoder_hidden_states=encoder_hidden_states[i:i + chunk]).sample
                for i in range(0, x.shape[0], chunk)]
        return SimpleNamespace(sample=torch.cat(outs))

    return forward


@pytest.mark.parametrize("chunk", [5, 6, 4], ids=["chunks-split-images", "chunks-of-one-image", "chunk-inside-image"])
def test_dc_loss_chunked_forward(unet, dc, chunk):
    """U-Net chunks (as dcfast.dc_scores makes them) need not align with images: K*T = 6 rows per image."""
    losses, samples, want, _ = dc
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        losses(chunked(unet, chunk), *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, want) <= DC_CHUNKED_TOL


def test_dc_loss_two_pass_recompute(unet, dc):
    """docs/design.md: the memory-bounded DC gradient: errors without grad -> dL/d err; then per chunk of 4 rows (splitting images),
    recompute with grad and backpropagate that chunk's rows. Needs evals_per_sample = K*T."""
    losses, samples, want, _ = dc
    captured = {}

    def capture(x, t, encoder_hidden_states):  # records the batched U-Net inputs and outputs of the loss
        captured.update(x=x, t=t, text=encoder_hidden_states, pred=unet(x, t, encoder_hidden_states=encoder_hidden_states).sample)
        return SimpleNamespace(sample=captured["pred"])

    with torch.no_grad():
        losses(capture, *samples)
    pred = captured["pred"].requires_grad_()
    (grad_pred,) = torch.autograd.grad(losses(lambda *a, **k: SimpleNamespace(sample=pred), *samples).sum(), pred)
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2, evals_per_sample=K * T):
        for i in range(0, pred.shape[0], 4):
            rows = slice(i, i + 4)
            out = unet(captured["x"][rows], captured["t"][rows], encoder_hidden_states=captured["text"][rows]).sample
            out.backward(grad_pred[rows])
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, want) <= DC_CHUNKED_TOL


# -- a small MLP: biases, tokens, chunks, float64 exactness --------------------------------------


class TokenMLP(nn.Module):
    """Linear layers with biases over (B, tokens, features), a nonlinearity, and a per-sample loss."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.hidden = nn.Linear(6, 5)
        self.frozen = nn.Linear(5, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(torch.tanh(self.hidden(torch.tanh(self.embed(x)))))


def mlp_losses(forward, x):
    return forward(x).square().sum((1, 2))


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-call", "chunked-forward"])
def test_mlp_biases_exact_in_float64(chunk):
    torch.manual_seed(0)
    model = TokenMLP().double()
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    params = ["embed.weight", "embed.bias", "hidden.weight", "hidden.bias"]
    acc = FisherAccumulator(model, params=[dict(model.named_parameters())[n] for n in params])
    assert list(acc.fisher) == params
    forward = model if chunk is None else (lambda v: torch.cat([model(v[i:i + chunk]) for i in range(0, 4, chunk)]))
    with acc.track(num_samples=4):
        mlp_losses(forward, x).sum().backward()
    want = naive(model, mlp_losses, (x,))
    assert set(want) == set(params)  # the frozen layer is not part of the naive loop either
    assert rel_err(acc.fisher, want) <= 1e-6


def test_mlp_bfloat16_close():
    """16-bit activations go through the same path (the op widens to float32 before the GEMM)."""
    torch.manual_seed(0)
    model = TokenMLP()
    x = torch.randn(4, 7, 3)
    want = naive(model, mlp_losses, (x,))
    acc = FisherAccumulator(model.bfloat16(), params=list(want))
    with acc.track(num_samples=4):
        mlp_losses(model, x.bfloat16()).float().sum().backward()
    assert rel_err(acc.fisher, want) <= 0.1


@pytest.mark.parametrize("chunk", [None, 7], ids=["whole-samples", "split-samples"])
def test_float16_loss_scale_keeps_small_gradients(chunk):
    """A GradScaler-style loss scale (L = 2**16 * sum_n loss_n) on fp16 gradients: the true per-sample
    output gradients (~1e-8..1e-7) are below fp16's normal range, so dividing the fp16 gradients by
    the scale would flush or round them before squaring; the accumulator scales the float32 squares
    instead. Whole samples (fused op) and samples split over calls (summed pieces) alike."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 6, bias=True).half()
    x = torch.randn(4, 5, 8).half()
    scaled_grad = (torch.rand(4, 5, 6) * 0.009 + 0.001).half()  # d L / d output under the 2**16 scale
    scale = 2.0 ** 16
    acc = FisherAccumulator(layer, params=[layer.weight, layer.bias])
    # chunks of 7 of the 20 token rows: samples of 5 rows straddle calls
    forward = layer if chunk is None else (
        lambda v: torch.cat([layer(v.reshape(20, 8)[i:i + chunk]) for i in range(0, 20, chunk)]).view(4, 5, 6))
    with acc.track(num_samples=4, loss_scale=scale):
        (forward(x) * scaled_grad).float().sum().backward()
    g = scaled_grad.double() / scale  # the true per-sample output gradients
    want = {"weight": torch.einsum("nro,nri->noi", g, x.double()).square().sum(0), "bias": g.sum(1).square().sum(0)}
    assert rel_err(acc.fisher, want) <= 1e-5


# -- EWC penalty, persistence, distributed ------------------------------------------------------------


def test_penalty_value_and_gradient():
    torch.manual_seed(0)
    model = TokenMLP()
    acc = FisherAccumulator(model, params=["embed.weight", "hidden.bias"])
    for f in acc.fisher.values():
        f.copy_(torch.rand(f.shape))
    anchor = acc.snapshot()
    assert acc.penalty(anchor).item() == 0.0
    with torch.no_grad():
        model.embed.weight.add_(0.3)
        model.hidden.bias.sub_(0.2)
    value = acc.penalty(anchor)
    value.backward()
    want = 0.5 * sum((acc.fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in anchor)
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(model.embed.weight.grad, acc.fisher["embed.weight"] * 0.3)
    assert model.hidden.weight.grad is None
    with pytest.raises(ValueError, match="anchor lacks"):
        acc.penalty({"embed.weight": anchor["embed.weight"]})


def test_state_dict_save_load(tmp_path):
    torch.manual_seed(0)
    model = TokenMLP()
    acc = FisherAccumulator(model, params=["embed.weight", "embed.bias"])
    with acc.track(num_samples=4):
        mlp_losses(model, torch.randn(4, 7, 3)).sum().backward()
    acc.save(tmp_path / "fisher.safetensors")
    fresh = FisherAccumulator(model, params=["embed.weight", "embed.bias"]).load(tmp_path / "fisher.safetensors")
    assert fresh.samples_seen == 4
    for n, f in acc.state_dict().items():
        assert torch.equal(fresh.fisher[n], f)
    other = FisherAccumulator(model, params=["embed.weight"])
    other.load_state_dict(acc.state_dict(), strict=False)
    assert torch.equal(other.fisher["embed.weight"], acc.fisher["embed.weight"])
    with pytest.raises(ValueError, match="unexpected"):
        other.load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="shape"):
        acc.load_state_dict({"embed.weight": torch.zeros(2, 2), "embed.bias": torch.zeros(6)})


def test_all_reduce(monkeypatch):
    import torch.distributed as dist

    model = TokenMLP()
    acc = FisherAccumulator(model, params=["embed.weight", "hidden.bias"])
    for f in acc.fisher.values():
        f.copy_(torch.rand(f.shape))
    before = {n: f.clone() for n, f in acc.fisher.items()}
    acc.all_reduce_()  # not initialised: a no-op
    assert all(torch.equal(acc.fisher[n], before[n]) for n in before)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: calls.append(t.numel()) or t.mul_(3))  # 3 ranks alike
    acc.all_reduce_()
    assert calls == [sum(f.numel() for f in before.values())]  # one collective
    for n in before:
        torch.testing.assert_close(acc.fisher[n], 3 * before[n])


# -- hooks and user errors ---------------------------------------------------------------------------


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_after_context_and_exception(unet):
    x0, noise, t, text = denoise_problem(1)
    acc = FisherAccumulator(unet)
    baseline = _hook_count(unet)
    with acc.track(num_samples=1):
        assert _hook_count(unet) == baseline + 96
        denoise_losses(unet, x0, noise, t, text).sum().backward()
    assert _hook_count(unet) == baseline
    with pytest.raises(KeyError):
        with acc.track(num_samples=1):
            out = denoise_losses(unet, x0, noise, t, text)  # saves inputs and output hooks
            raise KeyError("boom")
    assert _hook_count(unet) == baseline and not acc._tracking
    snapshot = {n: f.clone() for n, f in acc.fisher.items()}
    out.sum().backward()  # the graph built inside the failed track no longer reaches the Fisher
    unet.zero_grad(set_to_none=True)
    assert all(torch.equal(acc.fisher[n], snapshot[n]) for n in snapshot)
    assert acc.samples_seen == 1


def test_backward_outside_the_track_warns(unet):
    x0, noise, t, text = denoise_problem(1)
    acc = FisherAccumulator(unet)
    with pytest.warns(RuntimeWarning, match="no tracked layer received a gradient"):
        with acc.track(num_samples=1):
            loss = denoise_losses(unet, x0, noise, t, text).sum()
    loss.backward()
    unet.zero_grad(set_to_none=True)
    assert all(f.abs().max() == 0 for f in acc.fisher.values())


def test_lora_on_convolutions_matches_the_naive_loop():
    """A LoRA on the resnet convolutions (3x3 lora_A, 1x1 lora_B, nn.Conv2d) and on linear layers: the unfolded
    per-sample Fisher equals N separate backward passes, every factor covered."""
    unet = lora_unet(target_modules=("to_q", "conv1", "conv2", "proj_in"))
    x0, noise, t, text = denoise_problem(3)
    acc = FisherAccumulator(unet)
    convs = [n for n in acc.fisher if "conv1" in n or "conv2" in n]
    assert convs and all(acc.fisher[n].dim() == 4 for n in convs)
    assert set(acc.fisher) == {n for n, p in unet.named_parameters() if p.requires_grad}
    with acc.track(num_samples=3):
        denoise_losses(unet, x0, noise, t, text).sum().backward()
    unet.zero_grad(set_to_none=True)
    want = naive(unet, denoise_losses, (x0, noise, t, text), list(acc.fisher))
    assert rel_err(acc.fisher, want) < 1e-4


def test_lora_on_convolutions_with_chunks_inside_an_image():
    """Conv LoRA factors through chunks that split an image's K*T rows (the DC engine's chunking): the pieces of a
    sample's unfolded gradient are summed before squaring, as for nn.Linear."""
    unet = lora_unet(target_modules=("conv1", "conv2"))
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, SIZE, SIZE, generator=gen), torch.randn(2, T, 4, SIZE, SIZE, generator=gen)
    concepts, timesteps = torch.randn(K, TOKENS, 32, generator=gen), torch.tensor([100, 500, 900])

    def losses(forward, x0, noise, label):
        return dc_losses(forward, x0, noise, label, concepts, timesteps)

    samples = (x0, noise, torch.tensor([0, 1]))
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=2):
        losses(chunked(unet, 4), *samples).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert rel_err(acc.fisher, naive(unet, losses, samples, list(acc.fisher))) <= 1e-4


def test_a_layer_the_fisher_cannot_follow_is_refused_not_left_unprotected():
    """A grouped convolution's LoRA would escape every EWC penalty silently: refused, naming it."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    model.add_module("lora_A", nn.Sequential(nn.Conv2d(4, 4, 1, groups=4)))
    model.add_module("lora_B", nn.Sequential(nn.Linear(4, 4)))
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="neither nn.Linear nor a plain nn.Conv2d .*lora_A"):
        FisherAccumulator(model)
    assert len(FisherAccumulator(model, params=["lora_B.0.weight"]).fisher) == 1  # a subset chosen knowingly


def test_model_without_lora_raises():
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        FisherAccumulator(tiny_unet(seed=0, sample_size=SIZE))
    frozen = lora_unet().requires_grad_(False)
    with pytest.raises(ValueError, match="none requires grad"):
        FisherAccumulator(frozen)
    model = TokenMLP()
    with pytest.raises(ValueError, match="not the weight or bias of an nn.Linear"):
        FisherAccumulator(nn.Sequential(nn.Conv1d(2, 2, 1)), params=["0.weight"])
    with pytest.raises(ValueError, match="does not require grad"):
        FisherAccumulator(model, params=["frozen.weight"])
    with pytest.raises(ValueError, match="not a parameter name"):
        FisherAccumulator(model, params=["nope.weight"])
    with pytest.raises(ValueError, match="params is empty"):
        FisherAccumulator(model, params=[])


def test_rows_not_divisible_raises():
    model = TokenMLP()
    acc = FisherAccumulator(model, params=["embed.weight"])
    with pytest.raises(ValueError, match=r"21 input rows.*num_samples=2"):
        with acc.track(num_samples=2):
            mlp_losses(model, torch.randn(3, 7, 3)).sum().backward()
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        with acc.track(num_samples=0):
            pass
    with pytest.raises(TypeError, match="num_samples must be an int"):
        with acc.track(num_samples=2.0):
            pass


@pytest.mark.parametrize("engine", ["dc_scores", "dc_loss_backward"])
def test_through_the_dc_score_engine(engine):
    """dcfast's own DC engine, chunks of 5 U-Net rows against K*T = 6 rows per image: one graph over
    all chunks (dc_scores), or recompute-and-backward per chunk (dc_loss_backward). The U-Net runs in
    float64; the DC error kernel reduces in float32, hence the fp32 bound."""
    import dcfast

    unet, scheduler = lora_unet(torch.float64), tiny_scheduler()
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 4, SIZE, SIZE, generator=gen, dtype=torch.float64)
    cond = torch.randn(K, TOKENS, 32, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, T, 4, SIZE, SIZE, generator=gen, dtype=torch.float64)
    steps, labels = torch.tensor([100, 500, 900]), torch.tensor([1, 0])
    options = dict(timesteps=steps, max_batch=5)

    def loss_fn(err, b=slice(None)):
        return F.cross_entropy(dcfast.dc_logits(err), labels[b], reduction="sum")

    want = fisher_naive(unet, lambda b: loss_fn(dcfast.dc_scores(unet, scheduler, x0[b:b + 1], cond, noise=noise[b:b + 1],
                                                                 **options), slice(b, b + 1)), 2)
    acc = FisherAccumulator(unet)
    if engine == "dc_scores":
        with acc.track(num_samples=2):
            loss_fn(dcfast.dc_scores(unet, scheduler, x0, cond, noise=noise, **options)).backward()
    else:
        with acc.track(num_samples=2, evals_per_sample=K * T):
            dcfast.dc_loss_backward(unet, scheduler, x0, cond, loss_fn, noise=noise, **options)
    assert rel_err(acc.fisher, want) <= 1e-5


def test_interleaved_passes_need_evals_per_sample():
    model = TokenMLP()
    x = torch.randn(2, 8, 3)
    acc = FisherAccumulator(model, params=["embed.weight"])
    with pytest.raises(RuntimeError, match="evals_per_sample"):
        with acc.track(num_samples=2):
            for i in range(2):
                mlp_losses(model, x[i:i + 1]).sum().backward()
    acc.reset()
    with acc.track(num_samples=2, evals_per_sample=1):  # the same passes, rows per sample now known
        for i in range(2):
            mlp_losses(model, x[i:i + 1]).sum().backward()
    assert rel_err(acc.fisher, naive(model, mlp_losses, (x,), ["embed.weight"])) <= 1e-5


def test_second_backward_through_one_graph_raises():
    model = TokenMLP()
    acc = FisherAccumulator(model, params=["embed.weight"])
    with pytest.raises(RuntimeError, match="received a gradient twice"):
        with acc.track(num_samples=2):
            loss = mlp_losses(model, torch.randn(2, 7, 3)).sum()
            loss.backward(retain_graph=True)
            loss.backward()


def test_activation_checkpointing_raises():
    from torch.utils.checkpoint import checkpoint

    model = TokenMLP()
    acc = FisherAccumulator(model, params=["embed.weight"])
    x = torch.randn(2, 7, 3)
    with pytest.raises(RuntimeError, match="checkpointing"):
        with acc.track(num_samples=2):
            checkpoint(model, x, use_reentrant=False).square().sum().backward()
