"""Profile a few training steps (logging.profile_steps) and write where a step's time goes.

Small models train host-bound on a GPU (the first toy-world run: 0.3-0.5 s per step whatever the batch,
GPU mostly idle); the report says how many kernels a step launches, how long the host takes to issue them
and how busy the device is, and lists the most expensive operators on each side, so the next change to
the step loop is chosen from numbers taken on the device instead of guessed on a CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

PROFILE_AFTER_STEPS = 3  # steps run before profiling starts (the first compiles, the next warm caches)
TABLE_ROWS = 25


class StepProfiler:
    """Profiles steps [first, first + count) of a run (0-based step numbers as the trainer counts them)."""

    def __init__(self, folder: Path, first: int, count: int, device: torch.device, enabled: bool):
        self.folder, self.first, self.count, self.device = Path(folder), first, count, device
        self.enabled = enabled and count > 0
        self._prof = None
        self._t0 = 0.0

    def covers(self, step: int) -> bool:
        """Whether ``step`` is one of the profiled steps (on every rank, also those that do not profile)."""
        return self.first <= step < self.first + self.count

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> dict | None:
        """Call after step ``step`` was issued; writes the report after the last profiled step."""
        if self._prof is None or step != self.first + self.count - 1:
            return None
        if self.device.type == "cuda":  # the step loop does not wait for the device after each step
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.enabled = False
        try:
            return write_report(prof, self.folder, self.count, wall, self.device)
        except Exception as err:  # noqa: BLE001 -- a diagnostic must never end a training run
            return {"error": f"profile report failed: {type(err).__name__}: {err}"}


def _device_time_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # newer / older torch
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def write_report(prof, folder: Path, steps: int, wall_s: float, device: torch.device) -> dict:
    events = prof.events()
    on_gpu = device.type == "cuda"
    kernels = [e for e in events if on_gpu and str(getattr(e, "device_type", "")).endswith("CUDA")]
    averages = prof.key_averages()
    summary = {
        "steps": steps,
        "wall_ms_per_step": 1000 * wall_s / steps,
        "device": str(device),
        "aten_calls_per_step": sum(a.count for a in averages if a.key.startswith("aten::")) / steps,
    }
    if on_gpu:
        busy_us = sum(_device_time_us(e) for e in kernels)
        summary.update({
            "kernels_per_step": len(kernels) / steps,
            "device_busy_ms_per_step": busy_us / 1000 / steps,
            "device_busy_fraction": busy_us / 1e6 / wall_s if wall_s > 0 else None,
        })  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()]
    lines += ["", f"top {TABLE_ROWS} operators by self host time:",
              averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)]  # fmt: skip
    if on_gpu:
        key = "self_device_time_total" if averages and hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
        lines += ["", f"top {TABLE_ROWS} operators by self device time:",
                  averages.table(sort_by=key, row_limit=TABLE_ROWS)]  # fmt: skip
    (folder / "profile.txt").write_text("\n".join(lines) + "\n")
    (folder / "profile.json").write_text(json.dumps(summary, indent=1))
    return summary
