"""Shared test configuration: hypothesis profiles, the ``gpu`` and ``slow`` markers, and the
fixtures several test modules use (shared helpers that are not fixtures are in helpers.py).

Hypothesis profiles (select with ``--hypothesis-profile NAME``, which hypothesis' own pytest plugin
provides, or with the environment variable ``KDFUSE_HYPOTHESIS_PROFILE``; the command-line option
wins):

* ``ci``   (default): few examples, no deadline, failing examples printed with a reproduction blob.
* ``dev``: a few hundred examples, for local work on the kernels.
* ``long``: 10 000 examples, for fuzzing overnight.

Tests marked ``@pytest.mark.gpu`` are skipped when CUDA is not available. Tests marked
``@pytest.mark.slow`` (CPU compiles, real benchmark and command runs) are deselected by
``-m "not slow"``, the quick run; a plain ``pytest tests`` (CI) runs everything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, the hand-written Triton kernel runs under Triton's interpreter (numpy on the CPU),
# so CI tests the kernel source the GPU runs. Triton reads this once, before its first kernel is
# decorated: it has to be set here, ahead of any test module's imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make ``import kdfuse`` work from a plain checkout (``pytest`` as well as ``python -m pytest``).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Example generation is cheap next to the tensor work each example does; on a loaded 2-core CI
# box hypothesis would otherwise flag the slow (but correct) examples.
_SLOW_OK = [HealthCheck.too_slow]

# derandomize: CI runs the same examples every time (a red CI must be reproducible); the dev and
# long profiles explore.
settings.register_profile(
    "ci", max_examples=20, deadline=None, print_blob=True, derandomize=True, suppress_health_check=_SLOW_OK
)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile(
    "long",
    max_examples=10_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[*_SLOW_OK, HealthCheck.data_too_large],
)
# hypothesis' pytest plugin loads ``--hypothesis-profile`` later (in pytest_configure), so the
# command line overrides this default.
settings.load_profile(os.environ.get("KDFUSE_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the marker is known when run without it.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a CPU (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tuning_env(monkeypatch, tmp_path):
    """A private autotuning cache dir, default KDFUSE_* knobs and an empty in-process memo."""
    from kdfuse import env, tuning

    for name in ("AUTOTUNE", "PRINT_AUTOTUNING", "FORCE_RETUNE", "MEMORY_BUDGET"):
        monkeypatch.delenv(env.PREFIX + name, raising=False)
    monkeypatch.setenv("KDFUSE_CACHE_DIR", str(tmp_path / "cache"))
    tuning.clear_memo()
    yield
    tuning.clear_memo()


@pytest.fixture
def no_problem(monkeypatch):
    """The tuner's benchmark inputs are not built and its warm-up step does nothing (for stubbed
    benches at LLM sizes); records the keys built and the chunk sizes warmed up."""
    import helpers

    return helpers.no_problem_stubs(monkeypatch)


@pytest.fixture
def fake_cuda(monkeypatch, no_problem, tuning_env):
    """Lets resolve_chunk_size take its real CUDA path on a CPU-only machine: the device queries
    are stubbed (40 of 80 GiB free), and so is the benchmark problem; with tuning_env's private
    cache dir and empty memo. Yields no_problem's record."""
    GiB = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GiB, 80 * GiB))
    return no_problem


@pytest.fixture
def one_thread():
    """Real CPU work with one intra-op thread: on a busy machine, spinning OpenMP threads make
    tiny problems (and tiny benchmarks) many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
