"""Test configuration: hypothesis profiles, the `gpu` marker, thread limits for CI."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run only through the interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel is defined, so it must be set before any test imports a kernel
# module: whichever test an xdist worker runs first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI machines have 2 cores and run pytest-xdist with 2 workers: one intra-op thread per worker
# avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def fresh_lite3r_backend():
    """A clean Dynamo cache and no ``lite3r`` compile reports before and after the test; one
    Inductor compile thread (CI's 2 cores); the no-FP8-device warning of CPU runs silenced."""
    import warnings

    from lite3r_compile.backends.registration import NoFP8DeviceWarning, clear_compile_reports

    torch._dynamo.reset()
    clear_compile_reports()
    with torch._inductor.config.patch(compile_threads=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", NoFP8DeviceWarning)
        yield
    torch._dynamo.reset()
