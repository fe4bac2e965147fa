"""EWC and EWC-DC against docs/design.md's formulas: the DC term's pull and push variants, the auto temperature,
the penalty, and the per-sample Fisher (normalised or not), each expectation from a loop in formulas.py
with the prompts written out here."""
import json
import math

import pytest
import torch

import formulas
from dcfast.training.objectives import dc_term, fisher_pairs

# S of the toy task 2 (c_n, c_0, the one earlier concept), written out: the expectations never ask the method.
S = [formulas.PROMPT, formulas.CLASS_PROMPT, "a photo of red cat"]


def _by_hand(p, push, smoothing=0.0, c0_weight=1.0):
    """The DC term of one image from its probabilities p = [p(c_n), p(c_0), p(c_1), ...], in plain floats."""
    K = len(p)
    q = [1 - smoothing] + [smoothing / (K - 1)] * (K - 1)
    pull = -sum(qi * math.log(pi) for qi, pi in zip(q, p))
    weights = [c0_weight] + [1.0] * (K - 2)
    if push == "spec":
        return pull + sum(w * math.log(pi) for w, pi in zip(weights, p[1:]))  # - H(p, c_i) = log p(c_i)
    if push == "complement":
        return pull + sum(w * -math.log(1 - pi) for w, pi in zip(weights, p[1:]))
    return pull


@pytest.mark.parametrize("push, smoothing, c0_weight", [
    ("spec", 0.0, 1.0), ("complement", 0.0, 1.0), ("none", 0.0, 1.0),
    ("complement", 0.2, 0.5), ("spec", 0.1, 3.0), ("none", 0.3, 1.0)])
def test_dc_term_by_hand(push, smoothing, c0_weight):
    probs = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
    log_probs = torch.tensor(probs, dtype=torch.float64).log()
    ours = dc_term(log_probs, push, smoothing, c0_weight)
    hand = sum(_by_hand(p, push, smoothing, c0_weight) for p in probs) / len(probs)
    # float64 sums of O(1) log-probabilities; 1e-8 is far above any summation-order difference, far below a bug
    assert ours.item() == pytest.approx(hand, rel=1e-8, abs=1e-8)


def test_complement_is_bounded_and_spec_is_not():
    confident = torch.tensor([[0.98, 0.01, 0.01]]).log()  # c_n nearly certain: the spec's push dominates
    assert dc_term(confident, "spec").item() == pytest.approx(math.log(0.01) * 2 - math.log(0.98), rel=1e-5)
    assert dc_term(confident, "spec").item() < -9  # and it keeps falling as p(c_i) -> 0
    assert dc_term(confident, "complement").item() == pytest.approx(-math.log(0.98) - 2 * math.log(0.99), rel=1e-5)
    logits = torch.randn(500, 4, generator=torch.Generator().manual_seed(0)) * 6
    for push in ("complement", "none"):
        terms = torch.stack([dc_term(torch.log_softmax(row[None], -1), push) for row in logits])
        assert (terms >= 0).all()
    # p(c_0) rounds to 1 in float32: -log(1 - p) stays finite (about 100), and so does its gradient.
    logits = torch.tensor([[0.0, 100.0, 0.0]], requires_grad=True)
    term = dc_term(torch.log_softmax(logits, -1), "complement")
    (grad,) = torch.autograd.grad(term, logits)
    assert torch.isfinite(term) and 99 < term.item() < 202 and torch.isfinite(grad).all()


@pytest.mark.parametrize("push, smoothing, c0_weight, prediction", [
    ("spec", 0.0, 1.0, "epsilon"), ("complement", 0.0, 1.0, "epsilon"), ("none", 0.0, 1.0, "epsilon"),
    ("complement", 0.1, 0.5, "epsilon"), ("complement", 0.0, 1.0, "v_prediction")])
def test_ewc_dc_term_and_gradient_match_hand_computation(push, smoothing, c0_weight, prediction):
    method, params, task = formulas.toy_method("ewc-dc", dc_push=push, dc_label_smoothing=smoothing,
                                               dc_c0_weight=c0_weight, prediction_type=prediction)
    models = method.models
    assert method.concepts(task, None) == S
    conds = formulas.encode(models, S)
    x0 = task.latents[:2]
    timesteps = torch.tensor([[100, 700], [300, 900]])
    noise = torch.randn(2, 2, 4, 8, 8)
    ours = method.dc_loss(x0, conds, timesteps, noise)
    ours_grads = torch.autograd.grad(ours, list(params.values()))
    log_p = formulas.log_probs(models, x0, conds, timesteps, noise, formulas.TAU)
    pull = -((1 - smoothing) * log_p[:, 0] + smoothing / 2 * (log_p[:, 1] + log_p[:, 2]))
    if push == "spec":  # + H(c_n) - H(c_0) - H(c_1)
        hand = pull + c0_weight * log_p[:, 1] + log_p[:, 2]
    elif push == "complement":  # + H(c_n) - log(1 - p(c_0)) - log(1 - p(c_1))
        hand = pull - c0_weight * torch.log1p(-log_p[:, 1].exp()) - torch.log1p(-log_p[:, 2].exp())
    else:
        hand = pull
    hand = hand.mean()
    hand_grads = torch.autograd.grad(hand, list(params.values()))
    # float32 through two U-Net batchings (one row per call here, the engine's chunks there): each log p is a
    # difference of logits err / tau, so its rounding is relative to the logits' scale, and the term nets
    # pull and push terms of that size: the tolerance is relative to the sum of the terms' magnitudes, never
    # to the (cancelling) result's. Seen: 1.3e-5 on a result of 0.94 whose logits are ~1e2 (AMD EPYC, avx2).
    with torch.no_grad():
        logits = formulas.errors(models, x0, conds, timesteps, noise).mean(-1).abs().max().item() / formulas.TAU
    terms = 1 + smoothing + (c0_weight + 1 if push != "none" else 0)  # weights of the log p's in one image's term
    torch.testing.assert_close(ours, hand, rtol=0, atol=1e-6 * terms * max(1.0, logits))
    # The gradient nets pull and push terms too, so entries far below its largest carry rounding of that
    # size: 1e-3 of the largest (seen: 3.6e-5).
    for a, b in zip(ours_grads, hand_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


@pytest.mark.parametrize("name", ["ewc-dc", "dsc", "dsc+ewc-dc"])
def test_auto_temperature_is_the_spread_of_error_gaps(name):
    """tau = scale x RMS over images, k != n and pairs of err_k - err_n, at the task's start, on S of the Fisher."""
    method, params, task = formulas.toy_method(name, temperature="auto", auto_temperature_scale=2.0, num_dc_timesteps=2)
    models = method.models
    t, noise = fisher_pairs(models.noise_scheduler, task.latents, [0, 1, 2], 2, task.seed)
    with torch.no_grad():
        err = formulas.errors(models, task.latents, formulas.encode(models, S), t, noise)
    gaps = torch.stack([err[:, 1] - err[:, 0], err[:, 2] - err[:, 0]])
    expected = 2.0 * gaps.pow(2).mean().sqrt().item()
    assert method.temperature == pytest.approx(expected, rel=1e-4)
    assert 0.05 < (err.mean(-1)[:, 1:] - err.mean(-1)[:, :1]).abs().max().item() / method.temperature < 20
    if name == "ewc-dc":  # the Fisher's loss uses the measured tau
        x0 = task.latents[:1]
        t, noise = fisher_pairs(models.noise_scheduler, x0, [0], 2, task.seed)
        with torch.no_grad():
            # with the tau the method measured (equal to `expected` to float32 rounding, checked above), and a
            # float32 tolerance relative to the loss's scale: the two paths sum the errors in other orders
            hand = -formulas.log_probs(models, x0, formulas.encode(models, S), t, noise, method.temperature)[:, 0]
            objective = method.fisher_objective(task)
            torch.testing.assert_close(objective.losses([0]), objective.scale * hand.double(), rtol=1e-4,
                                       atol=1e-6 * objective.scale * max(1.0, hand.abs().item()))
    metrics = method.end_task(task)
    assert metrics["temperature"] == method.temperature  # into the task's metrics.json


def test_numeric_temperature_is_kept():
    method, _, _ = formulas.toy_method("ewc-dc", temperature=0.25)
    assert method.temperature == 0.25


def test_ewc_penalty_value_and_gradient():
    method, params, _ = formulas.toy_method("ewc-dc", ewc_lambda=3.0)
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    for n, f in fisher.items():
        method.fisher.fisher[n].copy_(f)
    method.anchor = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in params.items()}
    penalty = method.penalty()
    grads = torch.autograd.grad(penalty, list(params.values()))
    diff = {n: p.detach() - method.anchor[n] for n, p in params.items()}
    torch.testing.assert_close(penalty, 1.5 * sum((fisher[n] * diff[n] ** 2).sum() for n in params))
    for g, n in zip(grads, params):
        torch.testing.assert_close(g, 3.0 * fisher[n] * diff[n])


def _per_sample_loss(name, models, x0, image_id, seed):
    """Image `image_id`'s Fisher loss from the formula: EWC-DC -log softmax(-mean_j err / tau)[c_n] over S;
    EWC the denoising loss under c_n; both over the image's fisher_num_timesteps = 2 pairs."""
    t, noise = fisher_pairs(models.noise_scheduler, x0, [image_id], 2, seed)
    if name == "ewc-dc":
        return -formulas.log_probs(models, x0, formulas.encode(models, S), t, noise, formulas.TAU)[0, 0]
    pred = formulas.predictions(models, x0, formulas.encode(models, S[:1])[0], t, noise)
    return (formulas.targets(models, x0, t, noise) - pred).pow(2).mean()


@pytest.mark.parametrize("name, normalize, prediction", [
    ("ewc-dc", "none", "epsilon"), ("ewc-dc", "mean", "epsilon"), ("ewc", "none", "epsilon"), ("ewc", "mean", "epsilon"),
    ("ewc-dc", "mean", "v_prediction"), ("ewc", "none", "v_prediction"), ("ewc-dc", "merged", "epsilon"),
    ("ewc", "merged", "epsilon")])
def test_fisher_is_per_sample_normalised_and_merged_online(name, normalize, prediction):
    """F <- gamma F + F_n / s, F_n = sum_b (d loss_b / d theta)^2 by one autograd.grad per image, s = mean(F_n) or 1;
    "merged" then divides the merged F by its mean.

    For a v-prediction scheduler both losses compare with v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    method, params, task = formulas.toy_method(name, gamma=0.5, fisher_batch_size=2, fisher_normalize=normalize,
                                               prediction_type=prediction)
    models = method.models
    f_n = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(3):
        loss = _per_sample_loss(name, models, task.latents[b:b + 1], b, task.seed)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            f_n[n] += g ** 2
    mean = (sum(f.sum() for f in f_n.values()) / sum(f.numel() for f in f_n.values())).item()
    s = mean if normalize in ("mean", "merged") else 1.0
    past = {n: torch.rand_like(p) * f_n[n].max() / s for n, p in params.items()}  # both terms of the merge count
    for n in params:
        method.fisher.fisher[n].copy_(past[n])
    metrics = method.end_task(task)  # F_n in chunks of 2 images
    assert metrics["fisher_raw_mean"] == pytest.approx(mean, rel=1e-4)
    want_all = {n: 0.5 * past[n] + f_n[n] / s for n in params}
    if normalize == "merged":  # the merged F has mean 1: the penalty's total is lambda whatever the tasks held
        merged = sum(w.double().sum() for w in want_all.values()) / sum(p.numel() for p in params.values())
        want_all = {n: w / merged.item() for n, w in want_all.items()}
    for n in params:
        want = want_all[n]
        # squared float32 gradients of two U-Net batchings: 2x the gradients' relative rounding (seen: 1.3e-4)
        torch.testing.assert_close(method.fisher.fisher[n], want, rtol=5e-4, atol=1e-5 * want.abs().max().item())
        assert torch.equal(method.anchor[n], params[n].detach())
    if normalize == "mean":  # each task adds mean 1, whatever loss the Fisher comes from
        added = sum((method.fisher.fisher[n] - 0.5 * past[n]).sum() for n in params) / sum(p.numel() for p in params.values())
        assert added.item() == pytest.approx(1.0, rel=1e-4)


# --- saturated DC scores: p(c_n) ~ 1 -------------------------------------------------------------------------

@pytest.mark.parametrize("margin", [20.0, 120.0])
def test_dc_log_probs_keep_value_and_gradient_where_p_cn_rounds_to_one(margin):
    """log p and the gradient of -log p(c_n) against float64 by hand at logit margins 20 and 120, where float32
    log_softmax rounds log p(c_n) to 0 and loses the gradient's c_n part (from a margin of about 17)."""
    from dcfast.training.objectives import dc_log_softmax

    logits = torch.tensor([[3.0, 3.0 - margin, 3.0 - margin - 1.5]])  # float32, c_n first
    leaf = logits.double().requires_grad_(True)
    log_p = dc_log_softmax(leaf)
    (-log_p[0, 0]).backward()
    others = [math.exp(-margin), math.exp(-margin - 1.5)]  # p(c_i) / p(c_n), exact in float64 at both margins
    p_others = [o / (1 + sum(others)) for o in others]
    want_log_p = [-math.log1p(sum(others))] + [math.log(p) for p in p_others]
    want_grad = [-sum(p_others)] + p_others  # p - onehot(c_n), its c_n entry summed, never 1 - p(c_n)
    for got, want in zip(log_p[0].tolist() + leaf.grad[0].tolist(), want_log_p + want_grad):
        assert got == pytest.approx(want, rel=1e-9)
    assert log_p.dtype == torch.float64 and log_p[0, 0].item() < 0
    # what the stable form replaces: float32 log_softmax has lost the c_n part at these margins
    plain = logits.clone().requires_grad_(True)
    (-torch.log_softmax(plain, dim=-1)[0, 0]).backward()
    assert plain.grad[0, 0].item() == 0.0


def _saturated_task(margin):
    """EWC-DC on the toy model with one image whose best concept is c_n by a logit margin of `margin`: S is
    ordered so that the concept with the lowest DC error comes first, and tau is the gap / margin."""
    import dataclasses

    method, params, task = formulas.toy_method("ewc-dc", temperature=1.0, fisher_normalize="mean")
    models = method.models
    x0 = task.latents[:1]
    t, noise = fisher_pairs(models.noise_scheduler, x0, [0], 2, task.seed)
    with torch.no_grad():
        err = formulas.errors(models, x0, formulas.encode(models, S), t, noise).mean(-1)[0].double()
    order = err.argsort().tolist()
    prompts = [S[k] for k in order]
    gap = float(err[order[1]] - err[order[0]])
    task = dataclasses.replace(task, latents=x0, prompt=prompts[0], pretrained_concept_prompt=prompts[1],
                               past_prompts=prompts[2:])
    method.temperature = gap / margin
    return method, params, task, prompts


@pytest.mark.parametrize("margin", [20.0, 120.0])
def test_dc_fisher_holds_its_information_where_p_cn_saturates(margin):
    """The normalised DC Fisher of an image classified with p(c_n) ~ 1 (margin 120: 1 - p ~ 1e-52) against a
    float64 reference (the U-Net in float64, the per-sample gradient squared): the float32 log_softmax Fisher
    is exactly zero at margin 120 (no protection at all), and is wrong at margin 20."""
    import copy

    method, params, task, prompts = _saturated_task(margin)
    models = method.models
    reference = copy.deepcopy(models.unet).double()
    ref_params = {n: p for n, p in reference.named_parameters() if n in params}
    t, noise = fisher_pairs(models.noise_scheduler, task.latents, [0], 2, task.seed)
    conds = formulas.encode(models, prompts).double()
    ref_models = type(models)(reference, models.text_encoder, models.tokenizer, models.noise_scheduler, models.accelerator)
    err = formulas.errors(ref_models, task.latents.double(), conds, t.clone(), noise.double()).mean(-1)
    logits = -err / method.temperature
    loss = torch.log1p(torch.exp(logits[0, 1:] - logits[0, 0]).sum())  # -log p(c_n), float64 throughout
    grads = torch.autograd.grad(loss, list(ref_params.values()))
    want = {n: g ** 2 for n, g in zip(ref_params, grads)}
    raw_mean = sum(w.sum() for w in want.values()).item() / sum(w.numel() for w in want.values())
    assert raw_mean > 0
    for n in params:
        method.fisher.fisher[n].zero_()
    metrics = method.end_task(task)
    assert metrics["fisher_saturated_fraction"] == 1.0
    assert metrics["fisher_raw_mean"] == pytest.approx(raw_mean, rel=1e-3)
    for n in params:  # gamma * 0 + F_n / mean(F_n)
        torch.testing.assert_close(method.fisher.fisher[n].double(), want[n] / raw_mean, rtol=2e-3,
                                   atol=1e-4 * (want[n].max().item() / raw_mean))


def test_fisher_temperature_task_end_takes_the_dc_fisher_at_tau_measured_on_the_trained_model():
    """fisher_temperature "task_end": tau re-measured as "auto" measures it (RMS of the error gaps over every image and
    num_dc_timesteps strided pairs), on the LoRA the task has trained, and the raw F_n of -log p(c_n) at that tau."""
    method, params, task = formulas.toy_method("ewc-dc", temperature="auto", fisher_temperature="task_end",
                                               num_dc_timesteps=2, fisher_normalize="none", gamma=0.0)
    models = method.models
    start_tau = method.temperature
    with torch.no_grad():  # the task "trains": the LoRA moves, and the error gaps with it
        for p in params.values():
            p.mul_(2.0)
    t, noise = fisher_pairs(models.noise_scheduler, task.latents, [0, 1, 2], 2, task.seed)
    with torch.no_grad():
        err = formulas.errors(models, task.latents, formulas.encode(models, S), t, noise)
    end_tau = (err[:, 1:] - err[:, :1]).pow(2).mean().sqrt().item()
    assert not 0.8 < end_tau / start_tau < 1.25  # the two taus differ enough for the check below to tell them apart
    f_n = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in range(3):
        x0 = task.latents[b:b + 1]
        t, noise = fisher_pairs(models.noise_scheduler, x0, [b], 2, task.seed)
        loss = -formulas.log_probs(models, x0, formulas.encode(models, S), t, noise, end_tau)[0, 0]
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            f_n[n] += g ** 2
    metrics = method.end_task(task)
    # a difference of float32 errors summed in another order: a tolerance on the errors' scale, not the gaps'
    assert metrics["fisher_temperature"] == pytest.approx(end_tau, rel=1e-4, abs=1e-5 * err.abs().mean().item())
    assert metrics["temperature"] == start_tau  # the task's own tau is unchanged (its loss used it)
    for n in params:
        # squared float32 gradients of two U-Net batchings (as the per-sample Fisher test)
        torch.testing.assert_close(method.fisher.fisher[n], f_n[n], rtol=5e-4, atol=1e-5 * f_n[n].abs().max().item())


def test_dc_every_m_steps_weights_the_term_m_times_and_skips_it_between():
    """dc_every = 2: step 0 is L_denoise + 2 delta DC + penalty, step 1 EWC's L_denoise + penalty alone."""
    method, params, task = formulas.toy_method("ewc-dc", dc_every=2, delta=0.5)
    x0 = task.latents[:2]
    task.step = 0
    total, logs = method.loss(x0)
    assert total.item() == pytest.approx(logs["denoise"] + 2 * 0.5 * logs["dc"] + logs["penalty"], rel=1e-6)
    task.step = 1
    state = task.generator.get_state()
    total, logs = method.loss(x0)
    assert "dc" not in logs
    task.generator.set_state(state)
    assert torch.equal(total, method.denoise(x0) + method.penalty())


def test_a_run_with_dc_every_keeps_each_part_aligned_with_its_steps(make_config):
    from dcfast.io.runs import task_dir
    from dcfast.training.trainer import train

    config = make_config("ewc-dc", words=("dog",), max_train_steps=3, dc_every=2)
    train(config)
    losses = json.loads((task_dir(config.output_dir, 1) / "losses.json").read_text())["train"]
    assert len(losses["loss"]) == len(losses["dc"]) == len(losses["denoise"]) == 3
    assert losses["dc"][1] is None and losses["dc"][0] is not None and losses["dc"][2] is not None
