import os
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA. The variable is read when
# each @triton.jit decorator executes, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("COSMOS_FAST_FIXTURE",
                              REPO.parent / "shared" / "fixtures" / "official_tiny.pt"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """One torch thread for a test (modules opt in with ``pytestmark``): on a shared 2-core machine,
    2-thread OpenMP spins turn milliseconds into seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_official():
    if not FIXTURE.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"official fixture {FIXTURE} is missing (CI must run with shared/ beside the clone)")
        pytest.skip(f"official fixture {FIXTURE} not found (needs ../shared beside the clone)")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="session")
def official():
    """Outputs of the official COSMOS implementation on a small config (shared/fixtures)."""
    return _load_official()


@pytest.fixture(scope="session")
def official_model(official):
    from cosmos_fast import create_model

    model = create_model(official["config"])
    model.load_state_dict(official["state_dict"], strict=True)
    return model
