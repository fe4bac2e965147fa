"""The DC pass's shared work (dcfast.engine.unet_pass) and chunk plan / tuner (dcfast.engine.scores), against the naive loop.

Every share - prefix, kv, temb, and all of them together - must give the naive loop's errors and
gradients (to 1e-5 of their scale), on the plain and the peft-LoRA U-Net, chunked or not, under
`dc_scores` with grad and under `dc_loss_backward`; and switch itself off where it cannot be exact.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

import dcfast
from dcfast.engine import chunks, scores
from dcfast.engine import unet_pass
from dcfast.models.tiny import tiny_scheduler
from dcfast.engine.reference import dc_scores_naive

B, K, T, C = 2, 3, 2, 4
SHARE_SETS = {"plain": (), "prefix": ("prefix",), "kv": ("kv",), "temb": ("temb",), "default": None,
              "all": unet_pass.SHARES}
LORA = dict(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _with_lora(unet):
    wrapped = copy.deepcopy(unet)
    wrapped.add_adapter(LoraConfig(**LORA))
    return wrapped.eval()


@pytest.fixture(scope="module")
def lora_unet(unet):
    return _with_lora(unet)


def _problem(seed=0, size=(16, 16), per_image_timesteps=True, shared_noise=False, tokens=5, dim=32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, *size, generator=g)
    cond = torch.randn(K, tokens, dim, generator=g)
    timesteps = torch.randint(0, 1000, (B, T) if per_image_timesteps else (T,), generator=g)
    noise = torch.randn((T, C, *size) if shared_noise else (B, T, C, *size), generator=g)
    return x0, cond, timesteps, noise


def _close(got, want, tol=1e-5):
    return (got - want).abs().max().item() <= tol * want.abs().max().item()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_every_share_is_usable_on_the_tiny_unet_with_and_without_lora(unet, lora_unet):
    assert unet_pass.usable_shares(unet, unet_pass.SHARES) == frozenset(unet_pass.SHARES)
    assert unet_pass.usable_shares(lora_unet, unet_pass.SHARES) == frozenset(unet_pass.SHARES)
    assert scores.DEFAULT_SHARES <= frozenset(unet_pass.SHARES)
    with pytest.raises(ValueError, match="unknown"):
        unet_pass.usable_shares(unet, ("everything",))


@pytest.mark.parametrize("max_batch", [None, 1, 4, 5, 12], ids=["tuned", "chunk1", "chunk4", "chunk5", "chunk-all"])
@pytest.mark.parametrize("share", list(SHARE_SETS), ids=list(SHARE_SETS))
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_share_values_match_naive_loop(unet, lora_unet, scheduler, share, max_batch, with_lora):
    model = lora_unet if with_lora else unet
    x0, cond, timesteps, noise = _problem(seed=1)
    with torch.no_grad():
        got = dcfast.dc_scores(model, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=max_batch,
                               share=SHARE_SETS[share])
        want = dc_scores_naive(model, scheduler, x0, cond, timesteps=timesteps, noise=noise)
    assert got.shape == (B, K, T) and not got.is_inference()
    assert _close(got, want)


def _ce(err):
    labels = torch.arange(err.shape[0]) % err.shape[1]
    return F.cross_entropy(dcfast.dc_logits(err, temperature=0.1), labels)


def _grads(module, *extra):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]
                     + [t.grad.flatten() for t in extra])


@pytest.mark.parametrize("share", list(SHARE_SETS), ids=list(SHARE_SETS))
def test_share_gradients_match_naive_loop(lora_unet, scheduler, share):
    """LoRA, x0 and cond gradients of a DC cross-entropy: naive loop = dc_scores with grad = dc_loss_backward."""
    x0, cond, timesteps, noise = _problem(seed=2)
    x0_param, cond_param = x0.clone().requires_grad_(True), cond.clone().requires_grad_(True)

    def run(fn):
        x0_param.grad = cond_param.grad = None
        lora_unet.zero_grad()
        fn()
        return _grads(lora_unet, x0_param, cond_param)

    want = run(lambda: _ce(dc_scores_naive(lora_unet, scheduler, x0_param * 1.0, cond_param * 1.0,
                                           timesteps=timesteps, noise=noise)).backward())
    for max_batch in (None, 5):
        got = run(lambda: _ce(dcfast.dc_scores(lora_unet, scheduler, x0_param * 1.0, cond_param * 1.0,
                                               timesteps=timesteps, noise=noise, max_batch=max_batch,
                                               share=SHARE_SETS[share])).backward())
        assert _rel(got, want) <= 1e-5
        got = run(lambda: dcfast.dc_loss_backward(lora_unet, scheduler, x0_param * 1.0, cond_param * 1.0, _ce,
                                                  timesteps=timesteps, noise=noise, max_batch=max_batch,
                                                  share=SHARE_SETS[share]))
        assert _rel(got, want) <= 1e-5
    lora_unet.zero_grad()
    assert want.abs().sum() > 0


def _variant(**overrides):
    """A tiny U-Net with options the driver mirrors: linear projections, two transformer layers, centred input."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    config = dict(sample_size=16, in_channels=C, out_channels=C, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=32)
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


VARIANTS = {
    "linear-projection": dict(use_linear_projection=True),
    "two-transformer-layers": dict(transformer_layers_per_block=2),
    "centred-input": dict(center_input_sample=True),
}


@pytest.mark.parametrize("size", [(16, 16), (9, 12)], ids=["16x16", "odd-9x12"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_shares_on_unet_variants(scheduler, variant, size):
    model = _with_lora(_variant(**VARIANTS[variant]))
    assert unet_pass.usable_shares(model, unet_pass.SHARES) == frozenset(unet_pass.SHARES)
    x0, cond, timesteps, noise = _problem(seed=4, size=size)
    with torch.no_grad():
        want = dc_scores_naive(model, scheduler, x0, cond, timesteps=timesteps, noise=noise)
        for share in SHARE_SETS.values():
            got = dcfast.dc_scores(model, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=5,
                                   share=share)
            assert _close(got, want), share


def test_shares_with_shared_noise_and_v_prediction(unet):
    from diffusers import DDPMScheduler

    v_scheduler = DDPMScheduler.from_config(tiny_scheduler().config, prediction_type="v_prediction")
    x0, cond, timesteps, noise = _problem(seed=5, per_image_timesteps=False, shared_noise=True)
    with torch.no_grad():
        want = dc_scores_naive(unet, v_scheduler, x0, cond, timesteps=timesteps, noise=noise)
        got = dcfast.dc_scores(unet, v_scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=4)
    assert _close(got, want)


def test_shared_kv_cross_attention_equals_diffusers_default(lora_unet):
    """The shared processor's attention equals diffusers' AttnProcessor2_0 on rows (b, k, j) to 1e-5."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    layout = unet_pass.Layout(nb=2, nk=3, nt=2)
    g = torch.Generator().manual_seed(6)
    cond = torch.randn(3, 5, 32, generator=g)
    checked = 0
    with torch.no_grad():
        for attn in unet_pass._cross_attentions(lora_unet):
            width = attn.to_q.in_features
            hidden = torch.randn(layout.rows, 7, width, generator=g)
            default = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=layout.concepts_to_rows(cond))
            shared = unet_pass.SharedKVProcessor(layout)(attn, hidden, encoder_hidden_states=cond)
            assert _close(shared, default)
            pairs = torch.randn(layout.pairs, 7, width, generator=g)  # the prefix: one query per (b, j) pair
            prefix = unet_pass.cross_attention(attn, attn.to_q(pairs), cond, layout, query_per_pair=True,
                                               kv_per_concept=True)
            default = AttnProcessor2_0()(attn, layout.pairs_to_rows(pairs),
                                         encoder_hidden_states=layout.concepts_to_rows(cond))
            assert _close(prefix, default)
            checked += 1
    assert checked == 6  # down 2, mid 1, up 3


def test_processors_come_back_after_the_pass(lora_unet, scheduler):
    before = dict(lora_unet.attn_processors)
    x0, cond, timesteps, noise = _problem(seed=7)
    with torch.no_grad():
        dcfast.dc_scores(lora_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=5)
    with pytest.raises(ZeroDivisionError):  # also when the pass fails midway
        with unet_pass._Installed(lora_unet, unet_pass.Layout(1, 1, 1)):
            raise ZeroDivisionError
    after = lora_unet.attn_processors
    assert all(after[name] is processor for name, processor in before.items())


def test_hooks_switch_off_the_shares_they_would_see(lora_unet):
    to_k = lora_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    handle = to_k.register_forward_hook(lambda *args: None)
    try:
        assert unet_pass.usable_shares(lora_unet, unet_pass.SHARES) == frozenset({"temb"})  # to_k is in the prefix
    finally:
        handle.remove()
    resnet = lora_unet.down_blocks[1].resnets[0]
    handle = resnet.register_forward_pre_hook(lambda *args: None)
    try:  # a hook outside every shared module changes nothing
        assert unet_pass.usable_shares(lora_unet, unet_pass.SHARES) == frozenset(unet_pass.SHARES)
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert unet_pass.usable_shares(lora_unet, unet_pass.SHARES) == frozenset()
    finally:
        handle.remove()


def test_fisher_of_a_dc_pass_is_unchanged_by_the_shares(lora_unet, scheduler):
    """A Fisher track hooks every LoRA layer: the pass falls back to per-row work and the Fisher is the plain one."""
    x0, cond, timesteps, noise = _problem(seed=8)
    fishers = []
    for share in ((), None):
        acc = dcfast.FisherAccumulator(lora_unet)
        with acc.track(num_samples=B):
            assert unet_pass.usable_shares(lora_unet, unet_pass.SHARES) == frozenset({"temb"})
            err = dcfast.dc_scores(lora_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=5,
                                   share=share)
            F.cross_entropy(dcfast.dc_logits(err), torch.zeros(B, dtype=torch.long), reduction="sum").backward()
        lora_unet.zero_grad()
        fishers.append(torch.cat([f.flatten() for f in acc.fisher.values()]))
    assert fishers[0].abs().sum() > 0
    assert _rel(fishers[1], fishers[0]) <= 1e-5


def test_gradient_checkpointing_under_grad_runs_the_plain_pass(scheduler):
    model = _with_lora(_variant())
    model.enable_gradient_checkpointing()
    assert unet_pass.usable_shares(model, unet_pass.SHARES) == frozenset()
    with torch.no_grad():  # checkpointing only acts under grad
        assert unet_pass.usable_shares(model, unet_pass.SHARES) == frozenset(unet_pass.SHARES)
    x0, cond, timesteps, noise = _problem(seed=9)
    err = dcfast.dc_scores(model, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=5)
    with torch.no_grad():
        want = dc_scores_naive(model, scheduler, x0, cond, timesteps=timesteps, noise=noise)
    assert _close(err.detach(), want)


# ------------------------------------------------------------------------------------------------------
# The chunk plan and the tuner.
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budgets", [[1], [2], [5], [6], [7], [13], [100], [3, 40, 1, 9, 2]],
                         ids=["1", "2", "5", "6", "7", "13", "100", "changing"])
def test_plan_covers_every_row_once_image_major(budgets):
    Bp, Kp, Tp = 3, 3, 4
    calls = iter(budgets * 100)
    asked = []

    def budget():
        asked.append(next(calls))
        return asked[-1]

    rows = []
    for chunk in chunks.plan_chunks(Bp, Kp, Tp, budget):
        assert 0 < chunk.rows <= asked[-1]
        rows += [(b, k, j) for b in range(chunk.b0, chunk.b1) for k in range(chunk.k0, chunk.k1)
                 for j in range(chunk.j0, chunk.j1)]
    assert sorted(rows) == [(b, k, j) for b in range(Bp) for k in range(Kp) for j in range(Tp)]
    assert [b for b, _, _ in rows] == sorted(b for b, _, _ in rows)  # every image's rows before the next's


@pytest.mark.parametrize("per_row, timed, best", [
    ({16: 3.0, 32: 1.0, 64: 2.0, 128: 0.5}, [16, 32, 64], 32),  # 64 is slower: the ascent stops before 128
    ({16: 3.0, 32: 2.0, 64: 1.5, 128: 1.0}, [16, 32, 64, 128], 128),
    ({16: 1.0, 32: 1.02, 64: 0.9, 128: 2.0}, [16, 32, 64, 128], 64),  # within TUNE_STOP: keeps going
], ids=["u-shaped", "rising", "noisy"])
def test_tuner_ascends_and_keeps_the_fastest(monkeypatch, per_row, timed, best):
    """Fake clock: a chunk of r rows at budget c takes per_row[c] * r seconds, except first runs (set-up) 10x."""
    clock = [0.0]
    runs = []

    def fake_predictions(chunk):
        budget = chunk.rows  # K=4, T=16: each budget cuts chunks of exactly that many rows
        clock[0] += per_row[budget] * chunk.rows * (10 if budget not in runs else 1)
        runs.append(budget)

    monkeypatch.setattr(chunks.time, "perf_counter", lambda: clock[0])
    tuner = chunks.ChunkTuner()
    state = tuner.state("key", 4, 16, 256)
    assert state.candidates == (16, 32, 64, 128) and state.best is None
    inputs = SimpleNamespace(shape=(4, 16))
    assert chunks.tune(inputs, 4, state, fake_predictions) == best
    assert sorted(set(runs)) == timed and all(runs.count(c) >= chunks.TUNE_ROUNDS for c in timed)
    assert tuner.choices() == {"key": best} and tuner.state("key", 4, 16, 256) is state
    assert tuner.state("small", 8, 8, 16) is None  # one chunk holds the pass: nothing to tune
    tuner.clear()
    assert tuner.choices() == {}


def test_engine_tunes_once_per_key_before_its_work_and_max_batch_overrides(unet, scheduler):
    chunks.chunk_tuner.clear()
    x0, cond, timesteps, noise = _problem(seed=10, size=(8, 8))
    x0, noise, timesteps = x0.repeat(8, 1, 1, 1), noise.repeat(8, 1, 1, 1, 1), timesteps.repeat(8, 1)
    with torch.no_grad():  # 16 images: 96 rows, candidates 16, 32, 64 and 96 (12, 30, 60 and 96 rows cut)
        want = dc_scores_naive(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
        first = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
        (key, best), = chunks.chunk_tuner.choices().items()
        assert best in (16, 32, 64, 96)
        again = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
        dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=7)
    assert _close(first, want)
    assert torch.equal(first, again)  # tuned before the first call's work: one chunk size for every call
    assert chunks.chunk_tuner.choices() == {key: best}  # an explicit max_batch neither tunes nor changes it
    chunks.chunk_tuner.clear()


def test_no_tuning_runs_under_module_hooks(unet, scheduler):
    """A hook (a Fisher track, say) would see the timing runs: the engine takes CPU_FALLBACK rows instead."""
    chunks.chunk_tuner.clear()
    x0, cond, timesteps, noise = _problem(seed=11, size=(8, 8))
    x0, noise, timesteps = x0.repeat(8, 1, 1, 1), noise.repeat(8, 1, 1, 1, 1), timesteps.repeat(8, 1)
    calls = []
    handle = unet.conv_in.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise)
    finally:
        handle.remove()
    assert sum(calls) == 16 * K * T and max(calls) <= chunks.CPU_FALLBACK  # the real rows only
    assert set(chunks.chunk_tuner.choices().values()) == {None}
    chunks.chunk_tuner.clear()
