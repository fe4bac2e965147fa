"""Shared fixtures: tiny models built in code, seeded, no downloads; helper modules importable by name."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # python_tests/toy_runs.py: `import toy_runs`


# dcfast.models.loading imports diffusers: loaded by the fixtures that need it, so the op tests (python_tests/ops)
# run where only torch (and triton) are installed, as in CI's CUDA-build venv and on a bare GPU machine.
@pytest.fixture(scope="session")
def unet():
    from dcfast.models.tiny import tiny_unet

    return tiny_unet(seed=0)


@pytest.fixture(scope="session")
def scheduler():
    from dcfast.models.tiny import tiny_scheduler

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
    """Evaluation loads each task state as the toy model of toy_runs.py (the run's files are read for real)."""
    import toy_runs

    from dcfast.eval import evaluation

    monkeypatch.setattr(evaluation, "load_pipeline", toy_runs.load_toy_pipeline)
