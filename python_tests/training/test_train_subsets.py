"""The concept subsets S of EWC-DC and DSC, written out literally for every k and step."""
import pytest
import torch

from dcfast.training.methods import TaskData
from dcfast.training.methods.dsc import Distiller, DSCSettings
from dcfast.training.methods.ewc_dc import ewc_dc_concepts

PAST = ["c1", "c2", "c3", "c4"]


def _task(num_past):
    """Task n = num_past + 1: c_n = 'cn', c_0 = 'c0', earlier prompts c1 .. c_{n-1}."""
    return TaskData(index=num_past + 1, latents=torch.zeros(1), prompt="cn", pretrained_concept_prompt="c0",
                    past_prompts=PAST[:num_past])


@pytest.mark.parametrize("k, num_past, expected", [
    (2, 4, ["cn", "c0"]),
    (3, 4, ["cn", "c0", "c4"]),
    (4, 4, ["cn", "c0", "c3", "c4"]),
    (6, 4, ["cn", "c0", "c1", "c2", "c3", "c4"]),
    (7, 4, ["cn", "c0", "c1", "c2", "c3", "c4"]),  # |S| = min(k, n + 1)
    (4, 0, ["cn", "c0"]),  # task 1
    (6, 3, ["cn", "c0", "c1", "c2", "c3"]),
])
def test_ewc_dc_subset_most_recent(k, num_past, expected):
    """S of the Fisher (and of the auto temperature): the k-2 most recent earlier concepts."""
    assert ewc_dc_concepts(_task(num_past), k, None) == expected


def test_ewc_dc_subset_random_per_step():
    """S of each training step: k-2 earlier concepts drawn by the shared generator, kept in task order."""
    generator = torch.Generator().manual_seed(3)
    steps = [ewc_dc_concepts(_task(4), 4, generator) for _ in range(3)]
    assert steps == [["cn", "c0", "c3", "c4"], ["cn", "c0", "c3", "c4"], ["cn", "c0", "c1", "c4"]]
    generator = torch.Generator().manual_seed(3)
    assert ewc_dc_concepts(_task(2), 4, generator) == ["cn", "c0", "c1", "c2"]  # all fit: nothing drawn
    assert ewc_dc_concepts(_task(4), 2, generator) == ["cn", "c0"]


@pytest.mark.parametrize("k, num_past, m, expected", [
    (2, 4, 1, ["cn", "c2"]),  # k = 2: the two teachers' concepts
    (3, 4, 1, ["cn", "c0", "c2"]),
    (4, 4, 1, ["cn", "c0", "c2", "c4"]),
    (5, 4, 1, ["cn", "c0", "c2", "c3", "c4"]),
    (6, 4, 1, ["cn", "c0", "c2", "c1", "c3", "c4"]),
    (7, 4, 1, ["cn", "c0", "c2", "c1", "c3", "c4"]),  # |S| = min(k, n + 1) = 6
    (6, 3, 0, ["cn", "c0", "c1", "c2", "c3"]),  # the case: 5 concepts, not 4
    (7, 4, 3, ["cn", "c0", "c4", "c1", "c2", "c3"]),  # the case: 6 concepts, not 4
    (4, 1, 0, ["cn", "c0", "c1"]),  # task 2: only c_1 is earlier
    (2, 1, 0, ["cn", "c1"]),
    (4, 4, 3, ["cn", "c0", "c4", "c3"]),
])
def test_dsc_subset(k, num_past, m, expected):
    distiller = Distiller(config=None, settings=DSCSettings(num_dc_concepts=k), models=None)
    concepts = distiller.concepts(_task(num_past), m)
    assert concepts == expected
    assert concepts[distiller.m_column()] == PAST[m]  # where step_loss reads T2's concept c_m
