import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs a fixed, derandomised set of examples so that a red build always reproduces.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One MNIST-1D cache for the whole session (generating it takes a few seconds); the folder exists, as
    the command line requires of a --data-root it is given."""
    root = tmp_path_factory.getbasetemp() / "data"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other jobs share the cores (the
    command line does the same for MNIST-1D); the previous thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def accelerator_state():
    """accelerate keeps its state (device, mixed precision, gradient accumulation) in process-wide
    singletons: start each test that builds an ``Accelerator`` from a clean one, and leave one."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()


@pytest.fixture
def quick_figures(monkeypatch):
    """A comparison's figures as empty PNG headers: drawing dozens of real ones would take most of a study
    driver's smoke test (tests/test_plots.py and tests/test_cli.py draw real ones)."""
    from torch_mltp.experiments import comparison

    def write(result, path):
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        return path

    for name in ("plot_accuracy", "plot_alphas", "plot_gradient_cosine"):
        monkeypatch.setattr(comparison, name, write)
