"""Shared fixtures: tiny models built in code, seeded, no downloads; helper modules importable by name."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # python_tests/toy_runs.py: `import toy_runs`

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


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add overhead, and on a shared 2-core machine spinning OpenMP
    threads made these tests ~10x slower. Tests of threaded kernel paths set threads themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_runs(monkeypatch):
    """`dcfast.runs` replaced by the toy-layout reader of toy_runs.py."""
    import toy_runs

    monkeypatch.setitem(sys.modules, "dcfast.runs", toy_runs.fake_runs_module())
