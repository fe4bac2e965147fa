"""Shared fixtures: tiny models built in code, seeded, no downloads."""
import pytest
import torch

from dcfast.models import tiny_scheduler, tiny_unet


@pytest.fixture(scope="session")
def unet():
    return tiny_unet(seed=0)


@pytest.fixture(scope="session")
def scheduler():
    return tiny_scheduler()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
