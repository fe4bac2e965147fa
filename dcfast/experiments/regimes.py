"""The training regimes of the experiments: the TrainConfig values (shared fields and method settings, by
name, as a YAML file gives them) that replace defaults sized for real models, each with its reason.

World runs take WORLD_TRAIN plus WORLD_METHOD_TRAIN[method]; photo runs PHOTO_TRAIN. Everything else is
TrainConfig's default, or its method's.
"""
from typing import Dict

# TrainConfig values for world runs (the rest keep their defaults). Chosen on the validation sequence
# known-same-class-val with scripts/world_regime.py (table: benchmarks/world_regime.md), so that the shared LoRA,
# not the frozen per-task token, carries each concept, as on Stable Diffusion: at TrainConfig's rates
# (LoRA 1e-4, token 5e-3) the token alone held concept 1 and nothing later tasks did could erase it.
WORLD_TRAIN = {
    "learning_rate": 1e-3,  # the usual LoRA rate of short DreamBooth runs; stable here (rank 4, clipping at 1)
    "token_learning_rate": 1e-3,  # 5x below TrainConfig's: the token helps, the LoRA does the work
    "max_train_steps": 200,  # concept 1's colour learned at 200 steps; 400 steps changed no attribute's learning
    # The base model's sampling guidance (scripts/pretrain_tiny_base.py chose it on the world's attribute prompts,
    # no personal concept): evaluation and `dcfast eval` sample world runs with it.
    "validation_guidance_scale": 5.0,
    "checkpointing_steps": 10**9,  # no mid-task checkpoints: a task takes seconds, resuming would save nothing
}

# Per-method values on the world, on top of WORLD_TRAIN, each chosen on both validation sequences
# (benchmarks/methods_tuning.md). DSC at (k, T) = (3, 2): final fidelity 0.62 vs 0.56 at (4, 4) on
# known-same-class-val and 0.40 vs 0.38 on known-distinct-class-val, at 7 U-Net rows per image per distillation step
# instead of 17. TrainConfig keeps (4, 4), EWC-DC's choice (it lost at (3, 2): 0.65 vs 0.73).
WORLD_METHOD_TRAIN: Dict[str, Dict[str, object]] = {"dsc": {"num_dc_concepts": 3, "num_dc_timesteps": 2}}

# TrainConfig values for the photo demo (the rest keep their defaults).
PHOTO_TRAIN = {
    # Few steps per task on a CPU: a LoRA at lr 1e-4 barely moves in 100 steps; 1e-3 is the usual
    # LoRA rate for short DreamBooth runs and stays stable here (rank 4, grad-norm clipping at 1).
    "learning_rate": 1e-3,
    "max_train_steps": 100,  # 3 tasks of ewc-dc + evaluation: 71 s on 2 idle cores (--all: ~7 min)
    # No mid-task checkpoints: a demo task takes seconds, resuming it would save nothing.
    "checkpointing_steps": 10**9,
}


def train_values(method: str, photos: bool, overrides: Dict[str, object], max_train_steps=None) -> Dict[str, object]:
    """The TrainConfig values of one method's run: its regime, then `overrides`, then `max_train_steps` if given.

    Values name shared fields and settings alike; `TrainConfig.from_dict(..., ignore_other_methods=True)` keeps the settings the method reads.
    DSC distils for M steps after each task: a third of the task's steps keeps its cost comparable.
    """
    regime = PHOTO_TRAIN if photos else {**WORLD_TRAIN, **WORLD_METHOD_TRAIN.get(method, {})}
    values = {**regime, **overrides}
    if max_train_steps is not None:
        values["max_train_steps"] = max_train_steps
    values.setdefault("dsc_iterations", max(1, values["max_train_steps"] // 3))
    return values
