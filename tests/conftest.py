"""Shared pytest setup (keep minimal; fixtures welcome below).

Tests use tiny shapes, which run fastest single-threaded: on a busy 2-core machine OpenMP's thread pool
made a tiny TTT layer call ~100x slower (3 s vs 0.03 s). Set TTT_TEST_THREADS to use more threads.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("TTT_TEST_THREADS", "1")))
