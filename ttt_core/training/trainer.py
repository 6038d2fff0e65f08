"""One training stage: torchrun + FSDP2 (or a single process running the same code), checkpoints, logs.

Flow: distributed set-up (NCCL on GPUs, gloo on CPU; a one-process group when started without torchrun) ->
rank 0 builds the starting weights on the host (random with the run seed, or ``init_from``) -> every rank
builds the model on the meta device, marks the stage's trainable set, wraps each transformer block and the
root with ``fully_shard`` (bf16 compute / fp32 master + reduction when precision is bf16) and receives its
shards from rank 0 -> AdamW with per-group schedules -> the step loop. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import TTTDiTConfig, preset
from ..geometry import VideoGeometry
from .checkpoint import (
    STATE_NAME,
    export_inference_weights,
    is_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import (
    BatchPrefetcher,
    LatentVideoDataset,
    StepBatches,
    drop_text,  # noqa: F401 -- part of this module's interface (tests, callers)
    host_threads_for_gpu_process,
    read_manifest_records,
    write_manifest,
)
from .objective import NUM_TRAIN_TIMESTEPS, v_prediction_loss
from .optim import apply_trainable, build_optimizer
from .profiling import PROFILE_AFTER_STEPS, StepProfiler

METRICS_NAME = "metrics.jsonl"
# With stage.max_minutes the stage's length is planned from steady step times (not the first step, which
# compiles, nor profiled ones): first after TIME_PLAN_AFTER_STEPS of them, then again every REPLAN_EVERY steps
# from the times since the last plan, so a slow start (cold caches, allocator growth) cannot cut a stage short.
# The device run of 2026-11-23 planned from a window holding the profiled steps (3.0 s/step for 0.35 s steps)
# and ended its stages at a tenth of their budget.
TIME_PLAN_AFTER_STEPS = 10
REPLAN_EVERY = 25
PREFETCH_STEPS = 2  # step batches built ahead of the running step (one step's inputs each: a few MB)


# --------------------------------------------------------------------------------------------------
# distributed set-up
# --------------------------------------------------------------------------------------------------
def setup_distributed(device_pref: str):
    """(rank, world, device, created_group). Uses torchrun's environment when present."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    created = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        else:  # plain `python -m ...`: a one-process group so that the FSDP2 code path is the same
            if use_cuda:
                torch.cuda.set_device(0)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if use_cuda:  # the host only feeds the GPU: a bounded thread count (see host_threads_for_gpu_process)
        threads = host_threads_for_gpu_process()
        if threads is not None:
            torch.set_num_threads(threads)
    return rank, world, device, created


def log0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------------
def stage_model_config(cfg: TrainConfig) -> TTTDiTConfig:
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("scan_checkpoint_group_size", cfg.memory.scan_checkpoint_group_size)
    return preset(cfg.model.preset, **overrides)


def _resolve_init_entry(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model.init_from: {p} does not exist")
    if p.is_dir() and not is_checkpoint(p) and (p / "latest").is_file():
        p = latest_checkpoint(p) or p  # a previous stage's checkpoint.dir: take its newest checkpoint
    if is_checkpoint(p):
        return p / "model"
    return p


def previous_changed(init_from: list[str]) -> set[str]:
    """Backbone parameters that earlier stages changed (carried along so the export stays complete)."""
    from ..loading import KIND_PARTIAL, open_weights

    changed: set[str] = set()
    for entry in init_from:
        p = Path(entry).expanduser()
        if p.is_dir() and not is_checkpoint(p) and (p / "latest").is_file():
            p = latest_checkpoint(p) or p
        if is_checkpoint(p):
            changed |= set(json.loads((p / STATE_NAME).read_text()).get("changed", []))
        elif p.is_file():
            source = open_weights(p)
            if source.kind == KIND_PARTIAL:
                changed |= set(source.refs)
    return changed


def build_initial_model(cfg: TrainConfig, model_cfg: TTTDiTConfig):
    """The starting weights as a full fp32 model on the host (rank 0 only)."""
    from ..dit import TTTDiT
    from ..loading import load_ttt_dit, load_ttt_weights

    if not cfg.model.init_from:
        torch.manual_seed(cfg.run.seed)
        return TTTDiT(model_cfg).float()
    entries = [_resolve_init_entry(e) for e in cfg.model.init_from]
    second = entries[1] if len(entries) > 1 else None
    model = load_ttt_dit(entries[0], ttt_weights=second, config=model_cfg, dtype=torch.float32, device="cpu")
    for extra in entries[2:]:
        load_ttt_weights(model, extra, strict=False)
    return model


def _receive_from_rank0(param: torch.Tensor, full: torch.Tensor | None, rank: int) -> None:
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        # detach: moving a requires-grad parameter to CUDA yields a non-leaf, which distribute_tensor refuses
        src = (full.detach() if rank == 0 else torch.empty(param.shape, dtype=torch.float32)).to(mesh.device_type, torch.float32)
        local = distribute_tensor(src, mesh, param.placements, src_data_rank=0).to_local()
        with torch.no_grad():
            param.to_local().copy_(local.to(param.to_local().device, param.dtype))
    else:
        with torch.no_grad():
            param.copy_(full.to(param.device, param.dtype))


def build_sharded_model(cfg: TrainConfig, model_cfg: TTTDiTConfig, device: torch.device, rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from ..dit import TTTDiT

    initial = build_initial_model(cfg, model_cfg) if rank == 0 else None
    with torch.device("meta"):
        model = TTTDiT(model_cfg)
    trainable = apply_trainable(model, cfg.stage.trainable)
    model.enable_gradient_checkpointing(cfg.memory.activation_checkpointing)

    mixed = effective_precision(cfg, device)
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed == "bf16" else None, reduce_dtype=torch.float32)
    cpu_offload = cfg.memory.cpu_offload and device.type == "cuda"
    if cfg.memory.cpu_offload and not cpu_offload:
        log0("memory.cpu_offload ignored: there is no GPU to offload from")
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.memory.reshard_after_forward)
    for block in model.transformer_blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    model.to_empty(device="cpu" if cpu_offload else device)

    full_params = dict(initial.named_parameters()) if initial is not None else {}
    for name, p in model.named_parameters():
        _receive_from_rank0(p, full_params.get(name), rank)
    del full_params, initial
    model.train()
    return model, trainable


def effective_precision(cfg: TrainConfig, device: torch.device) -> str:
    return cfg.precision.mixed if device.type == "cuda" else cfg.precision.cpu_mixed


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------
class MetricsLog:
    """Console + metrics.jsonl (+ TensorBoard when the package is installed), rank 0 only."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = folder / METRICS_NAME
        self.tb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            # drop lines of steps after the checkpoint (they will be run again)
            kept = [r for r in read_manifest_records(self.path) if r.get("step", 0) <= resume_step]
            write_manifest(self.path, kept)
        elif resume_step is None and self.path.is_file():
            self.path.unlink()  # a fresh run in a folder without checkpoints
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(folder / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed (pip install 'comfyui-ttt-video[train]'); logging to "
                      f"{self.path} only", flush=True)  # fmt: skip

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB (peak RSS)


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------
class _StopFlag:
    def __init__(self):
        self.stop = False
        self._old = None

    def install(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.stop = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train_stage(cfg: TrainConfig, *, resume: bool = False, max_steps: int | None = None,
                save_final: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run (or continue) one stage. Returns a summary dict (steps run, last loss, timings, paths)."""
    rank, world, device, created_group = setup_distributed(cfg.run.device)
    stop = _StopFlag()
    stop.install()
    try:
        with contextlib.ExitStack() as resources:  # the batch prefetcher's thread, closed however _train ends
            return _train(cfg, rank, world, device, stop, resume, max_steps, save_final, resources)
    finally:
        stop.restore()
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, rank, world, device, stop, resume, max_steps, save_final, resources):
    # TTTDiT returns a reshaped view; the loss only reads it (no in-place op), so FSDP2's warning about
    # in-place ops on views does not apply.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    ckpt_root = Path(cfg.checkpoint.dir)
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise FileExistsError(
            f"{ckpt_root} already holds checkpoints; pass --resume to continue that run, or set checkpoint.dir "
            "to a new folder (nothing is overwritten)"
        )
    if resume and resume_from is None:
        log0(f"--resume: no checkpoint in {ckpt_root} yet; starting the stage from its beginning")

    model_cfg = stage_model_config(cfg)
    dataset = LatentVideoDataset(
        cfg.data.manifest,
        cfg.stage.segments,
        expect_channels=model_cfg.in_channels,
        expect_text=(model_cfg.max_text_seq_length, model_cfg.text_embed_dim),
        sample_posterior=cfg.data.sample_posterior,
    )
    if dataset.skipped_other_lengths:
        log0(f"data: {dataset.skipped_other_lengths} manifest item(s) of another length ignored (stage needs "
             f"{cfg.stage.segments} segment(s))")  # fmt: skip
    null_text = dataset.null_text() if cfg.data.text_dropout_mode == "empty_prompt" else None

    t0 = time.perf_counter()
    model, trainable = build_sharded_model(cfg, model_cfg, device, rank, world)
    optimizer, scheduler, schedules, group_names = build_optimizer(model, cfg)
    changed = sorted(previous_changed(cfg.model.init_from) | set(trainable))
    start_step = 0
    planned_steps = cfg.stage.steps  # shortened by a time budget (stage.max_minutes) once step times are known
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        planned_steps = min(int(state.get("planned_steps", planned_steps)), cfg.stage.steps)
        changed = sorted(set(changed) | set(state.get("changed", [])))
        log0(f"resumed from {resume_from} at step {start_step}")
    build_s = time.perf_counter() - t0

    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    B, A = cfg.data.batch_size, cfg.data.grad_accum_steps
    global_batch = B * A * world
    mixed = effective_precision(cfg, device)
    log0(
        f"stage {cfg.stage.name}: {cfg.stage.segments} segment(s), steps {start_step}->{cfg.stage.steps}, "
        f"{world} process(es) on {device.type}, precision {mixed}, global batch {global_batch} "
        f"({B} x {A} accum x {world}), {len(dataset)} item(s); parameters {n_total / 1e6:.2f} M, trainable "
        f"{n_train / 1e6:.2f} M ({cfg.stage.trainable}); model ready in {build_s:.1f} s"
    )

    metrics = MetricsLog(ckpt_root, rank == 0, cfg.logging.tensorboard, start_step if resume_from else None)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    end_step = planned_steps if max_steps is None else min(planned_steps, start_step + max_steps)
    budget_s = cfg.stage.max_minutes * 60.0
    loop_t0 = time.perf_counter()
    step = start_step
    last: dict[str, float] = {}
    step_times: list[float] = []
    steady_times: list[float] = []  # step times of windows with neither the first step nor profiled ones
    steady_issued = 0  # steps issued that count as steady (known when issued, so every rank agrees)
    last_plan_step: int | None = None
    time_plans: list[dict[str, float]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def trainer_state() -> dict[str, Any]:
        return {
            "stage": cfg.stage.name,
            "world_size": world,
            "samples_seen": step * global_batch,
            "planned_steps": planned_steps,
            "config": cfg.to_dict(),
            "model_config": model_cfg.to_dict(),
            "trainable": trainable,
            "changed": changed,
        }

    def checkpoint_now():
        path = save_checkpoint(ckpt_root, step, model=model, model_config=model_cfg, optimizer=optimizer,
                               scheduler=scheduler, trainer_state=trainer_state(), keep=cfg.checkpoint.keep)  # fmt: skip
        log0(f"checkpoint: {path}")
        return path

    # A step's batch is a pure function of (seed, step, rank): a background thread builds the next ones (file
    # reads, posterior draws, noise; pinned for an asynchronous copy on GPUs) while the current step runs.
    make_batches = StepBatches(dataset, cfg.run.seed, rank, B, A, world, cfg.data.text_dropout, null_text,
                               NUM_TRAIN_TIMESTEPS)  # fmt: skip
    on_gpu = device.type == "cuda"
    prefetcher = resources.enter_context(BatchPrefetcher(
        make_batches, range(start_step, end_step), depth=PREFETCH_STEPS, pin=on_gpu, cuda_device=device if on_gpu else None))  # fmt: skip
    data_waits: list[float] = []
    profiler = StepProfiler(ckpt_root, start_step + PROFILE_AFTER_STEPS, cfg.logging.profile_steps, device, rank == 0)

    # The device is synchronised only at flush points (log lines, the time plan, checkpoints, the stop check of
    # multi-process runs, the end), not after every step: a host-bound small model keeps the device queue fed
    # while the host prepares the next step. Until then each step's loss and gradient norm wait on the device.
    pending: list[tuple[int, torch.Tensor, torch.Tensor, dict]] = []
    window_t0 = time.perf_counter()

    def flush() -> None:
        nonlocal last, window_t0
        if not pending:
            return
        values = torch.stack([torch.stack([lo, gn.float()]) for _, lo, gn, _ in pending]).cpu().tolist()  # the sync
        now = time.perf_counter()
        per_step = (now - window_t0) / len(pending)  # exact over the window; its steps get the mean
        window_t0 = now
        for (at, _, _, host), (loss_value, grad_value) in zip(pending, values):
            loss_value /= world
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {at}; stopping (no checkpoint written)")
            step_times.append(per_step)
            if host["steady"]:
                steady_times.append(per_step)
            tokens_ = host.pop("tokens")
            last = {"loss": loss_value, "grad_norm": grad_value, "step_time_s": per_step,
                    "data_wait_s": host["data_wait_s"], "tokens_per_s": tokens_ * world / per_step,
                    "memory_gb": memory_gb(device), **host["lrs"]}  # fmt: skip
            metrics.log(at, last)
        pending.clear()

    stopped_by_signal = False
    step_cap = end_step
    while step < end_step:
        if profiler.covers(step) and not profiler.covers(step - 1):
            flush()  # the profiled steps get a window of their own: their time never reaches a plan
        profiler.before_step(step)
        ts = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        tokens = 0
        micro_batches = prefetcher.get(step)
        data_waits.append(time.perf_counter() - ts)
        for m, host_batch in enumerate(micro_batches):
            batch = host_batch.to(device)
            latents, text, noise, timesteps = batch.latents, batch.text, batch.noise, batch.timesteps
            _, F_, _, h, w = latents.shape
            tokens += B * VideoGeometry(text.shape[1], h, w, model_cfg.patch_size, text.shape[2]).total_tokens
            if A > 1:
                model.set_requires_gradient_sync(m == A - 1)
            loss = v_prediction_loss(model, latents, text, noise, timesteps,
                                     offload_activations=cfg.memory.offload_activations) / A
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, cfg.optimizer.grad_clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)  # asynchronous on the device: no host wait
        lrs = scheduler.get_last_lr()
        steady = step != start_step and not profiler.covers(step)
        steady_issued += steady
        pending.append((step + 1, loss_sum, grad_norm.detach(), {
            "data_wait_s": data_waits[-1], "tokens": tokens, "steady": steady,
            "lrs": {f"lr/{s.name}": lr for s, lr in zip(schedules, lrs)}}))  # fmt: skip
        profiled = profiler.after_step(step)
        if profiled:
            log0("profile (" + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in profiled.items())
                 + f"): {ckpt_root / 'profile.txt'}")  # fmt: skip
        step += 1
        plan_now = (bool(budget_s) and steady_issued >= TIME_PLAN_AFTER_STEPS and step < step_cap
                    and (last_plan_step is None or step - last_plan_step >= REPLAN_EVERY))
        checkpoint_due = bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0 and step < end_step
        log_due = step % cfg.logging.log_every == 0 or step == end_step
        # the first step (compilation) is a window of its own, so it does not inflate the steady step times
        if log_due or plan_now or checkpoint_due or profiled or step == start_step + 1:
            flush()
        if log_due:
            log0(
                f"step {step}/{planned_steps} loss {last['loss']:.5f} grad_norm {last['grad_norm']:.4f} "
                f"lr {max(lrs):.2e} {last['step_time_s']:.2f} s/step {last['tokens_per_s']:.0f} tok/s "
                f"mem {last['memory_gb']:.1f} GB data wait {data_waits[-1] * 1000:.0f} ms"
            )
        # every rank must agree on stopping (SIGTERM reaches them at slightly different times): checked by
        # all ranks at the same steps (the log steps) when there are several, at every step when alone
        if world > 1:
            stop_now = False
            if log_due or checkpoint_due:
                flag = torch.tensor([1.0 if stop.stop else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = flag.item() > 0
        else:
            stop_now = stop.stop
        if stop_now:
            flush()
            log0(f"SIGTERM: writing a checkpoint at step {step} and stopping (continue with --resume)")
            checkpoint_now()
            stopped_by_signal = True
            break
        if plan_now:
            # Every rank must plan the same end: the slowest recent step time and the least time left over all
            # ranks (one MAX reduction of both). The plan may shorten the stage or give back steps an earlier,
            # pessimistic plan took (never beyond stage.steps).
            recent = sorted(steady_times[-(REPLAN_EVERY if last_plan_step is not None else TIME_PLAN_AFTER_STEPS):])
            plan = torch.tensor([recent[len(recent) // 2], time.perf_counter() - loop_t0 - budget_s], device=device,
                                dtype=torch.float64)  # fmt: skip
            dist.all_reduce(plan, op=dist.ReduceOp.MAX)
            per_step, left_s = float(plan[0]), -float(plan[1])
            new_plan = min(cfg.stage.steps, step + max(1, int(left_s / per_step)))
            time_plans.append({"at_step": step, "per_step_s": per_step, "planned_steps": new_plan})
            if new_plan != planned_steps:
                if last_plan_step is None or abs(new_plan - planned_steps) > 0.02 * planned_steps:
                    log0(f"time budget {cfg.stage.max_minutes:g} min at {per_step:.3f} s/step (step {step}): the "
                         f"stage ends at step {new_plan} (of {cfg.stage.steps}); the learning rate anneals to there")
                planned_steps = new_plan
                end_step = min(step_cap, planned_steps)
                for schedule in schedules:  # LambdaLR keeps these objects: the re-planned end is checkpointed
                    schedule.total = planned_steps
            last_plan_step = step
        if checkpoint_due:
            checkpoint_now()
    flush()

    ckpt_path = None
    export_path = None
    if not stopped_by_signal and step > start_step and save_final:
        ckpt_path = checkpoint_now()
    if not stopped_by_signal and step == planned_steps and cfg.checkpoint.export and step > start_step:
        dtype = torch.bfloat16 if cfg.checkpoint.export_dtype == "bf16" else torch.float32
        export_path = export_inference_weights(model, model_cfg, ckpt_root / "export.safetensors", changed, dtype)
        log0(f"export (inference weights: TTT + {len([c for c in changed if 'ttt' not in c])} changed backbone "
             f"tensor(s)): {ckpt_root / 'export.safetensors'}")  # fmt: skip
    metrics.close()
    steady = steady_times or step_times
    return {
        "start_step": start_step,
        "end_step": step,
        "planned_steps": planned_steps,
        "time_plans": time_plans,
        "stopped_by_signal": stopped_by_signal,
        "last": last,
        "mean_step_time_s": sum(steady) / len(steady) if steady else float("nan"),
        "mean_data_wait_s": sum(data_waits[1:]) / len(data_waits[1:]) if len(data_waits) > 1 else float("nan"),
        "peak_memory_gb": memory_gb(device),
        "build_s": build_s,
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "export": str(export_path) if export_path else None,
        "world_size": world,
        "trainable_params": n_train,
        "total_params": n_total,
        "tokens_per_sample": tokens // max(B * A, 1),
    }
