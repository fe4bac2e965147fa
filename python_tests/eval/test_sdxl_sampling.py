"""Evaluation's model side on SDXL: dcfast's sampler against StableDiffusionXLPipeline, and DC classification
with the pooled embeddings and time ids."""
import torch
from diffusers import DDIMScheduler

from dcfast.engine.reference import dc_scores_naive
from dcfast.engine.targets import default_timesteps
from dcfast.eval.classify import classify_exhaustive
from dcfast.eval.sampling import default_time_ids, generate, pipeline_conditions
from dcfast.models.tiny import tiny_xl


def test_generate_matches_the_sdxl_pipeline():
    pipe = tiny_xl(seed=2)
    pipe.set_progress_bar_config(disable=True)
    ours = generate(pipe, "a photo of a dog", 2, num_inference_steps=4, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    theirs = pipe("a photo of a dog", num_images_per_prompt=2, num_inference_steps=4, guidance_scale=5.0,
                  latents=latents, output_type="pt", height=16, width=16).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours.std() > 0.01  # a decoded image, not a constant


def test_sdxl_classification_scores_are_the_engine_errors():
    pipe = tiny_xl(seed=1)
    conds = pipeline_conditions(pipe, ["a photo of a dog", "a photo of a mug", "a photo of a cat"])
    assert conds.hidden.shape == (3, 77, 64) and conds.pooled.shape == (3, 32)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    time_ids = default_time_ids(pipe)
    assert time_ids.tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    result = classify_exhaustive(pipe.unet, pipe.scheduler, x0, conds, num_timesteps=4,
                                 generator=torch.Generator().manual_seed(5), time_ids=time_ids)
    noise = torch.randn((2, 4, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        naive = dc_scores_naive(pipe.unet, pipe.scheduler, x0, conds.hidden, noise=noise,
                                timesteps=default_timesteps(1000, 4),
                                added_cond_kwargs={"text_embeds": conds.pooled, "time_ids": time_ids})
    want = naive.double().mean(-1)
    assert (result.errors - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(result.predictions, want.argmin(-1))
