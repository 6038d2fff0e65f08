"""Training checkpoints (safetensors + JSON only: nothing is ever pickled) and the inference export.

A checkpoint is a folder ``<checkpoint.dir>/step_XXXXXXXX``::

    model/config.json + model/diffusion_pytorch_model.safetensors.index.json + model/model-0000i.safetensors
        every parameter, full (unsharded) fp32 master weights, laid out as a diffusers transformer folder so
        that ``load_ttt_dit(<ckpt>/model)`` and ``init_from`` read it directly
    optimizer/index.json + optimizer/state-0000i.safetensors   AdamW exp_avg / exp_avg_sq per parameter
    optimizer/param_groups.json    group hyper-parameters, parameter names per group, AdamW step per parameter
    scheduler.json                 LambdaLR state (the schedules themselves come from the config)
    rng/rank<r>.safetensors + rng/rank<r>.json   torch CPU / CUDA and Python RNG states of every rank
    trainer_state.json             step, samples seen, world size, config, trainable / changed parameter names

Tensors are gathered one parameter at a time (``DTensor.full_tensor``, a collective every rank joins) and
rank 0 writes shards of at most ``SHARD_BYTES``, so host memory holds one shard, not the whole model.
Everything is written into ``.tmp-step_XXXXXXXX`` and renamed when complete; ``latest`` (a one-line text file)
is replaced atomically after the rename. A crash at any point leaves the previous checkpoint intact.

Loading reads each tensor lazily from the safetensors files (memory-mapped) and keeps only the local shard
(``distribute_tensor(..., src_data_rank=None)``: every rank slices the same full tensor, no communication), so
a checkpoint written with one world size resumes with any other.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from .data import atomic_save_safetensors, atomic_write_text, load_safetensors

SHARD_BYTES = 2 * 1024**3
LATEST = "latest"
STATE_NAME = "trainer_state.json"
FORMAT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective for DTensors: every rank must call it in the same order)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` into ``param`` (a DTensor: only this rank's shard is kept; no communication)."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            local_target = param.to_local()
            mesh_device = param.device_mesh.device_type
            src = full.to(device=mesh_device, dtype=param.dtype)
            local = distribute_tensor(src, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local_target.copy_(local.to(local_target.device))
        else:
            param.copy_(full.to(device=param.device, dtype=param.dtype))


def like_param(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A new tensor sharded like ``param`` holding ``full`` (for optimizer state)."""
    if isinstance(param, DTensor):
        src = full.to(device=param.device_mesh.device_type, dtype=torch.float32)
        dt = distribute_tensor(src, param.device_mesh, param.placements, src_data_rank=None)
        local_device = param.to_local().device
        if dt.to_local().device != local_device:  # CPU offload: state lives next to the sharded parameter
            dt = DTensor.from_local(dt.to_local().to(local_device), param.device_mesh, param.placements,
                                    shape=param.shape, stride=param.stride())  # fmt: skip
        return dt
    return full.to(device=param.device, dtype=torch.float32).clone()


class _ShardWriter:
    """Collects tensors on rank 0 and writes numbered safetensors shards of bounded size."""

    def __init__(self, folder: Path, prefix: str, metadata: dict[str, str] | None = None):
        self.folder, self.prefix, self.metadata = folder, prefix, metadata or {}
        self.current: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.weight_map: dict[str, str] = {}
        self.count = 0
        self.is_writer = _rank() == 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if not self.is_writer:
            return
        self.current[name] = tensor.contiguous()
        self.bytes += tensor.numel() * tensor.element_size()
        if self.bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.is_writer or not self.current:
            return
        self.count += 1
        fname = f"{self.prefix}-{self.count:05d}.safetensors"
        atomic_save_safetensors(self.current, self.folder / fname, {"format": "pt", **self.metadata})
        for k in self.current:
            self.weight_map[k] = fname
        self.current, self.bytes = {}, 0


def _model_config_json(model_config) -> str:
    # A diffusers-style transformer config.json: ttt_core.loading reads our TTT fields from it too.
    data = {"_class_name": "CogVideoXTransformer3DModel", **model_config.to_dict()}
    return json.dumps(data, indent=2, sort_keys=True)


def save_model_folder(model: torch.nn.Module, model_config, folder: Path) -> None:
    """Every parameter (full, fp32) as a diffusers-style transformer folder. Collective."""
    folder.mkdir(parents=True, exist_ok=True) if _rank() == 0 else None
    writer = _ShardWriter(folder, "model")
    for name, p in model.named_parameters():
        writer.add(name, full_tensor(p).float())
    for name, b in model.named_buffers():
        writer.add(name, full_tensor(b))
    writer.flush()
    if writer.is_writer:
        index = {"metadata": {"format": "ttt_video training checkpoint"}, "weight_map": writer.weight_map}
        atomic_write_text(folder / "diffusion_pytorch_model.safetensors.index.json", json.dumps(index, indent=1))
        atomic_write_text(folder / "config.json", _model_config_json(model_config))


def _param_names(optimizer, model) -> dict[int, str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {id(p): by_id[id(p)] for g in optimizer.param_groups for p in g["params"]}


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    model_config,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step_{step:08d}`` atomically (collective: every rank calls it). Returns its path."""
    root = Path(root)
    rank = _rank()
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / "rng").mkdir()
        (tmp / "optimizer").mkdir()
    _barrier()

    save_model_folder(model, model_config, tmp / "model")

    names = _param_names(optimizer, model)
    writer = _ShardWriter(tmp / "optimizer", "state")
    steps: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            pname = names[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    writer.add(f"{pname}/{key}", full_tensor(st[key]).float())
            if "step" in st:
                steps[pname] = float(st["step"])
    writer.flush()
    if rank == 0:
        groups = []
        for group in optimizer.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hyper.items()}
            groups.append({"hyper": hyper, "param_names": [names[id(p)] for p in group["params"]]})
        atomic_write_text(tmp / "optimizer" / "index.json", json.dumps({"weight_map": writer.weight_map}, indent=1))
        atomic_write_text(tmp / "optimizer" / "param_groups.json", json.dumps({"groups": groups, "steps": steps}, indent=1))
        # the schedules themselves are rebuilt from the config; LambdaLR wants one entry per group
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
        atomic_write_text(tmp / "scheduler.json", json.dumps(sched, indent=1))
        state = dict(trainer_state, step=step, format_version=FORMAT_VERSION, saved_at=time.time())
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=1, sort_keys=True))

    # every rank: its RNG states
    rng_tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng_tensors["torch_cuda"] = torch.cuda.get_rng_state()
    atomic_save_safetensors(rng_tensors, tmp / "rng" / f"rank{rank}.safetensors")
    py_state = random.getstate()
    atomic_write_text(tmp / "rng" / f"rank{rank}.json", json.dumps({"python": [py_state[0], list(py_state[1]), py_state[2]]}))
    _barrier()

    if rank == 0:
        if final.exists():  # same step saved again (e.g. SIGTERM right after an interval save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep, protect={name})
    _barrier()
    return final


def _prune(root: Path, keep: int, protect: set[str]) -> None:
    if keep <= 0:
        return
    ckpts = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in ckpts[:-keep]:
        if old not in protect:
            shutil.rmtree(root / old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE_NAME).is_file():
            return path
    ckpts = sorted(p for p in root.glob("step_*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
    return ckpts[-1] if ckpts else None


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / STATE_NAME).is_file() and (Path(path) / "model").is_dir()


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Fill (sharded) parameters from a checkpoint's model folder; every parameter must be present."""
    from ..loading import _Reader, open_weights

    source = open_weights(folder)
    missing = [n for n, _ in model.named_parameters() if n not in source.refs]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:5]}")
    with _Reader() as reader:
        for name, p in model.named_parameters():
            ref = source.refs[name]
            if tuple(ref.shape) != tuple(p.shape):
                raise ValueError(f"{folder}: {name} has shape {tuple(ref.shape)}, the model {tuple(p.shape)}")
            shard_into(p, reader.get(ref, dtype=torch.float32))


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns trainer_state."""
    path = Path(path)
    state = json.loads((path / STATE_NAME).read_text())
    load_model_weights(model, path / "model")

    names = _param_names(optimizer, model)
    index = json.loads((path / "optimizer" / "index.json").read_text())["weight_map"]
    groups = json.loads((path / "optimizer" / "param_groups.json").read_text())
    saved_names = [g["param_names"] for g in groups["groups"]]
    current_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if saved_names != current_names:
        raise ValueError(
            f"{path}: the optimizer parameter groups differ from this run's (was the trainable set or the model "
            "changed?); resume needs the same stage config"
        )
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    try:
        for g_saved, group in zip(groups["groups"], optimizer.param_groups):
            for k, v in g_saved["hyper"].items():
                group[k] = tuple(v) if k == "betas" else v
            for p in group["params"]:
                pname = names[id(p)]
                if pname not in groups["steps"]:
                    continue
                st = {"step": torch.tensor(groups["steps"][pname], dtype=torch.float32)}
                for key in ("exp_avg", "exp_avg_sq"):
                    fname = index[f"{pname}/{key}"]
                    if fname not in handles:
                        handles[fname] = safe_open(str(path / "optimizer" / fname), framework="pt", device="cpu")
                    st[key] = like_param(p, handles[fname].get_tensor(f"{pname}/{key}"))
                optimizer.state[p] = st
    finally:
        handles.clear()

    sched = json.loads((path / "scheduler.json").read_text())
    scheduler.load_state_dict(sched)

    rank = _rank()
    rng_file = path / "rng" / f"rank{rank}.safetensors"
    if state.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1) and rng_file.is_file():
        rng = load_safetensors(rng_file)
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        py = json.loads((path / "rng" / f"rank{rank}.json").read_text())["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    return state


def export_inference_weights(model: torch.nn.Module, model_config, path: Path, changed: Iterable[str], dtype) -> Path | None:
    """TTT parameters + every changed backbone parameter as one safetensors file (``save_ttt_weights``).

    Collective (gathers each exported parameter); rank 0 writes. The file loads with
    ``load_ttt_dit(<CogVideoX weights>, ttt_weights=path)`` (the Model Loader's "TTT weights").
    """
    from ..dit import TTTDiT
    from ..loading import is_ttt_key, save_ttt_weights

    changed = set(changed)
    wanted = [n for n, _ in model.named_parameters() if is_ttt_key(n) or n in changed]
    gathered = {}
    for name, p in model.named_parameters():
        if name in wanted:
            t = full_tensor(p).to(dtype)
            if _rank() == 0:
                gathered[name] = t
    out = None
    if _rank() == 0:
        with torch.device("meta"):
            view = TTTDiT(model_config)
        for name, t in gathered.items():
            mod_name, _, leaf = name.rpartition(".")
            view.get_submodule(mod_name)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        extra = sorted(n for n in gathered if not is_ttt_key(n))
        out = save_ttt_weights(view, path, names=extra, overwrite=True)
    _barrier()
    return out
