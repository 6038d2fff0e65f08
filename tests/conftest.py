"""Shared pytest setup (keep minimal; fixtures welcome below).

Tests use tiny shapes, which run fastest single-threaded: on a busy 2-core machine OpenMP's thread pool
made a tiny TTT layer call ~100x slower (3 s vs 0.03 s). Set TTT_TEST_THREADS to use more threads.
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TTT_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
    """Import one of the repo's scripts (scripts/, benchmarks/: not part of the package) by its path."""

    def load(relpath: str):
        path = ROOT / relpath
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
