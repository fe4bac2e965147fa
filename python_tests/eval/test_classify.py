"""dcfast.eval.classify: adaptive candidate elimination against exhaustive DC scoring."""

import pytest
import torch

from dcfast.eval.classify import check_stages, classify, classify_exhaustive
from dcfast.models.tiny import tiny_scheduler
from dcfast.engine.scores import dc_scores
from dcfast.engine.targets import default_timesteps

import toy_runs  # python_tests/toy_runs.py, on sys.path through conftest.py

COLOURS = torch.tensor([toy_runs.RED, toy_runs.BLUE, toy_runs.GREEN, toy_runs.GREY])


@pytest.fixture
def toy():
    """A point-mass denoiser over 4 colour concepts, and textured images of concepts 0..3 (2 each)."""
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4, 5, 32, generator=g)
    model = toy_runs.ToyDenoiser()
    model.fit(cond, COLOURS)
    labels = torch.arange(4).repeat_interleave(2)
    x0 = (2 * COLOURS[labels] - 1)[:, :, None, None] + 0.1 * torch.randn(8, 3, 8, 8, generator=g)
    return model, cond, x0, labels


def test_adaptive_matches_exhaustive_top1_on_clear_margin(toy):
    model, cond, x0, labels = toy
    sched = tiny_scheduler()
    adaptive = classify(model, sched, x0, cond, stages=((4, 2), (16, 1)), generator=torch.Generator().manual_seed(1))
    exhaustive = classify_exhaustive(model, sched, x0, cond, num_timesteps=16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(exhaustive.predictions, labels)
    assert torch.equal(adaptive.predictions, exhaustive.predictions)
    # all 4 candidates on 4 pairs, then the best 2 on the 12 new pairs, never recomputing the first 4
    assert adaptive.unet_evals == 8 * (4 * 4 + 2 * 12) < exhaustive.unet_evals == 8 * 4 * 16
    assert adaptive.seconds_per_image > 0


def test_keep_all_schedule_equals_dc_scores():
    """With every candidate kept, staged scoring reuses earlier pairs and equals one dc_scores pass."""
    unet, _ = toy_runs.tiny_unet_and_vae()
    sched = tiny_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(3, 16, 32, generator=g)
    staged = classify(unet, sched, x0, cond, stages=((2, 3), (4, 3)), generator=torch.Generator().manual_seed(5))
    noise = torch.randn((2, 4, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        err = dc_scores(unet, sched, x0, cond, timesteps=default_timesteps(1000, 4), noise=noise)
    torch.testing.assert_close(staged.errors, err.mean(-1).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(staged.predictions, err.mean(-1).argmin(-1))
    assert staged.unet_evals == 2 * 3 * 4


@pytest.mark.parametrize("stages,match", [((), "at least one"), (((4, 0),), "must be >= 1"),
                                          (((8, 2), (4, 1)), "must not shrink")],
                         ids=["empty", "keep-0", "shrinking"])
def test_check_stages_errors(stages, match):
    with pytest.raises(ValueError, match=match):
        check_stages(stages)
