"""Trainable sets, AdamW parameter groups and per-group learning-rate schedules (paper Table 2 / App. A).

Grouping follows the official optimiser: a parameter is a "TTT parameter" when its name contains ``ttt``
(our TTT layers ``transformer_blocks.i.ttt.*`` and gates ``transformer_blocks.i.ttt_gates.*``); it skips
weight decay when its name contains ``bias`` or ``norm`` or it is a TTT bias ``b1`` / ``b2``. That gives up
to four groups (TTT / other x decay / no decay); each has its own schedule: warm-up linear from 0, then
cosine (TTT) or linear (others) from its peak to ``lr_end``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .config import TrainConfig

_QKVO = re.compile(r"^transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)\.")


def is_ttt_parameter(name: str) -> bool:
    return "ttt" in name.lower()


def skips_weight_decay(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return "bias" in name.lower() or "norm" in name.lower() or leaf in ("b1", "b2")


def is_trainable(name: str, trainable: str) -> bool:
    if trainable == "all":
        return True
    if trainable == "ttt":
        return is_ttt_parameter(name)
    if trainable == "ttt_qkvo":
        return is_ttt_parameter(name) or bool(_QKVO.match(name))
    raise ValueError(f"unknown trainable set {trainable!r}")


def apply_trainable(model: torch.nn.Module, trainable: str) -> list[str]:
    """Set requires_grad by the stage's trainable set; returns the trainable parameter names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, trainable))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"trainable set {trainable!r} selects no parameter of the model")
    return names


@dataclass
class GroupSchedule:  # mutable: a time budget re-plans `total` mid-stage (LambdaLR checkpoints its fields)
    name: str
    kind: str  # cosine | linear | constant
    peak: float
    end: float
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        """Multiplier of the group's peak lr at optimiser step ``step`` (0-based)."""
        if self.peak == 0.0:
            return 1.0
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        decay = max(1, self.total - self.warmup)
        frac = min((step - self.warmup) / decay, 1.0)
        if self.kind == "cosine":
            return (self.end + (self.peak - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))) / self.peak
        return 1.0 - frac * (1.0 - self.end / self.peak)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW over the trainable parameters in up to four groups + a LambdaLR with one schedule per group.

    Returns (optimizer, scheduler, schedules, group_param_names).
    """
    opt = cfg.optimizer
    buckets: dict[str, list] = {"ttt_wd": [], "ttt_no_wd": [], "other_wd": [], "other_no_wd": []}
    names: dict[str, list[str]] = {k: [] for k in buckets}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("ttt" if is_ttt_parameter(name) else "other") + ("_no_wd" if skips_weight_decay(name) else "_wd")
        buckets[key].append(p)
        names[key].append(name)
    groups, schedules, group_names = [], [], []
    for key, params in buckets.items():
        if not params:
            continue
        is_ttt = key.startswith("ttt")
        peak = opt.lr_ttt if is_ttt else opt.lr
        groups.append({"params": params, "lr": peak, "weight_decay": 0.0 if key.endswith("no_wd") else opt.weight_decay})
        schedules.append(
            GroupSchedule(
                name=key,
                kind=opt.schedule_ttt if is_ttt else opt.schedule,
                peak=peak,
                end=opt.lr_end,
                warmup=cfg.warmup_steps,
                total=cfg.stage.steps,
            )
        )
        group_names.append(names[key])
    if not groups:
        raise ValueError("no trainable parameters: check stage.trainable")
    optimizer = torch.optim.AdamW(groups, betas=tuple(opt.betas), eps=opt.eps, foreach=opt.foreach)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=list(schedules))
    return optimizer, scheduler, schedules, group_names
