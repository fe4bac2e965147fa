"""The DC engine on an SDXL U-Net (added conditions text_embeds and time_ids) against the naive loop."""
import copy

import pytest
import torch
from peft import LoraConfig

import dcfast
from dcfast.engine.reference import dc_scores_naive
from dcfast.engine.scores import dc_scores_with_predictions
from dcfast.engine.unet_pass import SHARES, usable_shares
from dcfast.models.tiny import tiny_xl_unet

B, K, T, C, S = 2, 3, 2, 4, 8
POOLED, TIME_IDS = 32, 6


@pytest.fixture(scope="module")
def xl_unet():
    unet = tiny_xl_unet(seed=3)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet.eval()


def _problem(seed=0, per_image_time_ids=True):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, S, S, generator=g)
    cond = torch.randn(K, 5, 64, generator=g)
    text_embeds = torch.randn(K, POOLED, generator=g)
    # SDXL's ids are pixel sizes and crop offsets: (orig_h, orig_w, top, left, target_h, target_w)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [24.0, 20, 2, 4, 16, 16]])
    if not per_image_time_ids:
        time_ids = time_ids[1]
    timesteps = torch.randint(0, 1000, (T,), generator=g)
    noise = torch.randn(B, T, C, S, S, generator=g)
    return x0, cond, dict(text_embeds=text_embeds, time_ids=time_ids), timesteps, noise


def test_shares_on_sdxl_keep_only_the_exact_ones(xl_unet):
    with torch.no_grad():
        assert usable_shares(xl_unet, SHARES) == {"kv", "temb"}  # prefix: emb depends on the concept


@pytest.mark.parametrize("share", [None, (), ("kv", "temb")], ids=["default", "plain", "kv+temb"])
@pytest.mark.parametrize("max_batch", [None, 5, 1])
def test_sdxl_scores_match_naive_loop(xl_unet, scheduler, share, max_batch):
    x0, cond, added, timesteps, noise = _problem()
    with torch.no_grad():
        fused = dcfast.dc_scores(xl_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=max_batch,
                                 share=share, added_cond_kwargs=added)
        naive = dc_scores_naive(xl_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, added_cond_kwargs=added)
    assert fused.shape == (B, K, T)
    assert (fused - naive).abs().max() <= 1e-5 * naive.abs().max()


def test_sdxl_scores_depend_on_time_ids_and_pooled_embedding(xl_unet, scheduler):
    """The added conditions reach the prediction (a pass that dropped them would still match itself)."""
    x0, cond, added, timesteps, noise = _problem(per_image_time_ids=False)
    with torch.no_grad():
        base = dcfast.dc_scores(xl_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, added_cond_kwargs=added)
        other_ids = dcfast.dc_scores(xl_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                                     added_cond_kwargs=dict(added, time_ids=added["time_ids"] * 2))
        other_pooled = dcfast.dc_scores(xl_unet, scheduler, x0, cond, timesteps=timesteps, noise=noise,
                                        added_cond_kwargs=dict(added, text_embeds=added["text_embeds"].flip(0)))
    assert (base - other_ids).abs().max() > 1e-3 * base.abs().max()
    assert (base - other_pooled).abs().max() > 1e-3 * base.abs().max()


def _grads(unet, *tensors):
    params = [p for p in unet.parameters() if p.requires_grad]
    return torch.cat([p.grad.flatten() for p in params] + [t.grad.flatten() for t in tensors])


def _zero(unet):
    for p in unet.parameters():
        p.grad = None


def test_sdxl_gradients_match_naive_loop(xl_unet, scheduler):
    """Gradients of a DC loss to the LoRA, the conditions and the pooled embeddings: engine (grad mode and the
    memory-bounded two-pass gradient) against the naive loop."""
    x0, cond, added, timesteps, noise = _problem(seed=2)
    unet = copy.deepcopy(xl_unet)
    target = torch.tensor([0, 2])

    def loss_fn(err):
        return torch.nn.functional.cross_entropy(dcfast.dc_logits(err, temperature=0.01), target)

    results = []
    for run in ("naive", "engine", "memory-bounded"):
        _zero(unet)
        cond_in = cond.clone().requires_grad_(True)
        pooled = added["text_embeds"].clone().requires_grad_(True)
        kwargs = dict(timesteps=timesteps, noise=noise, added_cond_kwargs=dict(added, text_embeds=pooled * 1.0))
        if run == "naive":
            loss_fn(dc_scores_naive(unet, scheduler, x0, cond_in * 1.0, **kwargs)).backward()
        elif run == "engine":
            loss_fn(dcfast.dc_scores(unet, scheduler, x0, cond_in * 1.0, max_batch=4, **kwargs)).backward()
        else:
            dcfast.dc_loss_backward(unet, scheduler, x0, cond_in * 1.0, loss_fn, max_batch=4, **kwargs)
        results.append(_grads(unet, cond_in, pooled))
    naive, engine, bounded = results
    scale = naive.abs().max()
    assert scale > 0
    assert (engine - naive).abs().max() <= 1e-4 * scale
    assert (bounded - naive).abs().max() <= 1e-4 * scale


def test_sdxl_predictions_are_the_rows_of_the_pass(xl_unet, scheduler):
    x0, cond, added, timesteps, noise = _problem(seed=4)
    with torch.no_grad():
        _, pred = dc_scores_with_predictions(xl_unet, scheduler, x0, cond, (2,), timesteps=timesteps,
                                             noise=noise, added_cond_kwargs=added, max_batch=3)
        alphas = scheduler.alphas_cumprod[timesteps].view(1, T, 1, 1, 1)
        x_t = alphas.sqrt() * x0.unsqueeze(1) + (1 - alphas).sqrt() * noise
        direct = xl_unet(x_t.flatten(0, 1), timesteps.repeat(B), encoder_hidden_states=cond[2:3].expand(B * T, -1, -1),
                         added_cond_kwargs={"text_embeds": added["text_embeds"][2:3].expand(B * T, -1),
                                            "time_ids": added["time_ids"].repeat_interleave(T, 0)}).sample
    assert pred.shape == (B, 1, T, C, S, S)
    assert (pred[:, 0].flatten(0, 1) - direct).abs().max() <= 1e-5 * direct.abs().max()


@pytest.mark.parametrize("case", ["missing", "extra-key", "wrong-k", "wrong-b", "wrong-width", "sd-unet"])
def test_sdxl_bad_added_conditions_name_the_problem(xl_unet, scheduler, unet, case):
    x0, cond, added, timesteps, noise = _problem()
    model, kwargs, pattern = xl_unet, dict(added_cond_kwargs=added), None
    if case == "missing":
        kwargs, pattern = {}, "needs added_cond_kwargs"
    elif case == "extra-key":
        kwargs, pattern = dict(added_cond_kwargs=dict(added, image_embeds=added["text_embeds"])), "exactly"
    elif case == "wrong-k":
        kwargs, pattern = dict(added_cond_kwargs=dict(added, text_embeds=added["text_embeds"][:2])), "K=3"
    elif case == "wrong-b":
        kwargs, pattern = dict(added_cond_kwargs=dict(added, time_ids=torch.zeros(3, 6))), "B=2"
    elif case == "wrong-width":
        kwargs, pattern = dict(added_cond_kwargs=dict(added, time_ids=torch.zeros(2, 5))), "projection_class"
    else:
        model, cond, x0, noise = unet, cond[..., :32], torch.randn(B, C, 16, 16), torch.randn(B, T, C, 16, 16)
        pattern = "no added conditions"
    with pytest.raises(ValueError, match=pattern):
        dcfast.dc_scores(model, scheduler, x0, cond, timesteps=timesteps, noise=noise, **kwargs)


def test_sdxl_dc_fisher_matches_per_sample_loop(xl_unet, scheduler):
    """The per-sample Fisher of a DC loss on the SDXL pass (EWC-DC's), accumulated in one backward, against one
    backward per image through the naive loop."""
    from dcfast.engine.fisher import FisherAccumulator
    from dcfast.engine.reference import fisher_naive

    x0, cond, added, timesteps, noise = _problem(seed=6)
    unet = copy.deepcopy(xl_unet)
    label = torch.tensor([1, 0])

    def losses(scores, images):
        err = scores(unet, scheduler, x0[images], cond, timesteps=timesteps, noise=noise[images],
                     added_cond_kwargs=dict(added, time_ids=added["time_ids"][images]))
        return torch.nn.functional.cross_entropy(dcfast.dc_logits(err, 0.01), label[images], reduction="none")

    want = fisher_naive(unet, lambda i: losses(dc_scores_naive, slice(i, i + 1)).sum(), B)
    acc = FisherAccumulator(unet)
    with acc.track(num_samples=B):
        losses(dcfast.dc_scores, slice(0, B)).sum().backward()
    unet.zero_grad(set_to_none=True)
    assert set(acc.fisher) == set(want)
    worst = max(((acc.fisher[n].double() - want[n].double()).norm() / want[n].double().norm()).item() for n in want)
    assert worst <= 1e-4


def _saved_bytes_and_grads(unet, scheduler, checkpoint, with_predictions=False):
    """Bytes autograd keeps for the backward of one DC pass (4-row chunks), and the gradients it gives."""
    x0, cond, added, timesteps, noise = _problem(seed=8)
    cond = cond.clone().requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    _zero(unet)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if with_predictions:
            err, pred = dc_scores_with_predictions(unet, scheduler, x0, cond, (0, 2), timesteps=timesteps, noise=noise,
                                                   max_batch=4, added_cond_kwargs=added, checkpoint=checkpoint)
            err = err + pred.mean()
        else:
            err = dcfast.dc_scores(unet, scheduler, x0, cond, timesteps=timesteps, noise=noise, max_batch=4,
                                   added_cond_kwargs=added, checkpoint=checkpoint)
    torch.nn.functional.cross_entropy(dcfast.dc_logits(err, 0.01), torch.tensor([0, 1])).backward()
    return sum(saved), err.detach(), _grads(unet, cond)


@pytest.mark.parametrize("with_predictions", [False, True], ids=["scores", "scores+predictions"])
def test_checkpointed_pass_keeps_a_chunk_not_the_pass(xl_unet, scheduler, with_predictions):
    """checkpoint=True: the same errors and gradients, with a fraction of the activations kept for the backward."""
    unet = copy.deepcopy(xl_unet)
    plain_bytes, plain_err, plain_grads = _saved_bytes_and_grads(unet, scheduler, False, with_predictions)
    kept_bytes, kept_err, kept_grads = _saved_bytes_and_grads(unet, scheduler, True, with_predictions)
    assert torch.equal(plain_err, kept_err)
    assert (kept_grads - plain_grads).abs().max() <= 1e-5 * plain_grads.abs().max()
    assert kept_bytes < plain_bytes / 5


def test_checkpointed_noise_predictions_keep_a_chunk_not_the_rows(xl_unet, scheduler):
    """predict_rows(checkpoint=True), DSC's student predictions under dc_checkpoint: the same outputs and gradients
    as the plain call, with a chunk's activations kept for the backward instead of every row's."""
    from dcfast.models.prompts import Conditions
    from dcfast.training.objectives import predict_rows

    unet = copy.deepcopy(xl_unet)
    x0, cond, added, timesteps, noise = _problem(seed=9)
    timesteps = timesteps.expand(x0.shape[0], -1)  # (B, T): rows (b, j)
    runs = []
    for checkpoint in (False, True):
        hidden = cond[1].clone().requires_grad_(True)
        pooled = added["text_embeds"][1].clone().requires_grad_(True)
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        _zero(unet)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = predict_rows(unet, scheduler, x0, Conditions(hidden, pooled), timesteps, noise,
                               added["time_ids"], max_batch=1, checkpoint=checkpoint)
        out.pow(2).mean().backward()
        grads = torch.cat([_grads(unet, hidden), pooled.grad.reshape(-1)])
        runs.append((sum(saved), out.detach(), grads))
    (plain_bytes, plain_out, plain_grads), (kept_bytes, kept_out, kept_grads) = runs
    assert plain_out.shape[0] == timesteps.numel() > 1
    assert (kept_out - plain_out).abs().max() <= 1e-5 * plain_out.abs().max()  # 1-row chunks: other batch sums
    assert (kept_grads - plain_grads).abs().max() <= 1e-5 * plain_grads.abs().max()
    assert kept_bytes < plain_bytes / 2
