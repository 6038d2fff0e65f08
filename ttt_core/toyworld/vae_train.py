"""Train the toy world's video VAE (diffusers ``AutoencoderKLCogVideoX``) on clips rendered on the fly.

``train_vae(out_dir, steps=..., batch_size=...)`` (CLI: ``ttt-video toyworld train-vae``) writes a diffusers
folder ``out_dir/{config.json, diffusion_pytorch_model.safetensors}`` (fp32) plus ``metrics.jsonl`` and
``train_vae.json`` (settings and final numbers). See docs/toyworld.md, "Training the VAE".

Data: random TRAIN world seeds (never held-out ones), a random 1-5 segment story each, rendered at 64x96;
clips of ``clip_frames`` = 4 k + 1 frames at random starts, a quarter of them placed across a camera cut or
scene change. Clips live in a pool (on the training device) that the training step samples from; worker
processes render fresh clips in the background and replace the oldest ones. The step therefore never
waits for data: if rendering is slower than training, clips are reused more (the log's ``new`` column is
the fraction of sampled clips that were fresh). Workers send numpy arrays through pipes, so nothing relies
on /dev/shm.

Loss: L1 + MSE on pixels in [-1, 1] of the decoded posterior sample + ``kl_weight`` x mean KL. AdamW, linear
warm-up then cosine to 10 %, gradient clipping, bf16 autocast on CUDA (fp32 weights), fp32 on CPU.

While running, everything lives in ``<out_dir>.partial/`` (metrics, ``checkpoint/`` every
``checkpoint_every`` steps: weights and AdamW moments as safetensors, the step in JSON); ``resume=True``
continues from it. At the end the latent std of the posterior mode over 64 training clips sets
``scaling_factor = 1 / std`` (CogVideoX convention: ``latents * scaling_factor`` has unit variance), the
model is saved into the partial folder, and that folder is renamed to ``out_dir``.

Importing this module does not import torch (the CLI builds its parser without it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .dataset import TRAIN_SEEDS
from .render import DEFAULT_SIZE, check_size, render_story, segment_frame_ranges
from .world import generate_story, palette

# The settled toy-world VAE (docs/toyworld.md; 8 latent channels = preset "toyworld" in_channels).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(4, 8, 16, 32),
    latent_channels=8,
    layers_per_block=1,
    norm_num_groups=2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    temporal_compression_ratio=4,
    sample_height=DEFAULT_SIZE[0],
    sample_width=DEFAULT_SIZE[1],
    scaling_factor=1.0,  # replaced by 1 / latent std at the end of training
)

PARTIAL_SUFFIX = ".partial"
CHECKPOINT_DIR = "checkpoint"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "train_vae.json"
MAX_STORY_SEGMENTS = 5  # 49..241 frames per story; several clips are cut from each
CLIPS_PER_STORY_FRAMES = 1.5  # clips per story ~ 1.5 x frames / clip_frames (overlapping clips: cheaper data)
CUT_FRACTION = 0.25  # clips placed across a cut or scene change (random clips cross one ~30 % of the time too)
EVAL_CLIPS = 64
FILL_TIMEOUT_S = 600
EVAL_TASK = 2**48  # task index of the evaluation clips (training tasks count up from 0)
FOREGROUND_ROLES = ("cat", "mouse", "cheese", "scarf")  # small things; the background dominates plain accuracy


# --------------------------------------------------------------------------------------------------
# data: clips of training stories (numpy only, so worker processes stay light)
# --------------------------------------------------------------------------------------------------
def check_clip_frames(clip_frames: int) -> int:
    clip_frames = int(clip_frames)
    # 4 k + 1 frames -> k + 1 latent frames; diffusers' CogVideoX decoder only gives back 4 k + 1 frames when
    # k + 1 is odd (an even latent chunk is upsampled without its causal first frame: 2 latents -> 8 frames)
    if clip_frames < 9 or (clip_frames - 1) % 8:
        raise ValueError(f"clip_frames {clip_frames}: need 8 m + 1 frames (9, 17, 25, ..., 49), an odd number of "
                         "latent frames for the CogVideoX VAE's causal 4x time compression")
    return clip_frames


def story_clips(rng: np.random.Generator, clip_frames: int, size=DEFAULT_SIZE, max_clips: int | None = None,
                cut_fraction: float = CUT_FRACTION) -> list[np.ndarray]:
    """Clips (uint8 [clip_frames, H, W, 3]) of one random training story: random starts, some across a cut."""
    min_segments = max(1, math.ceil((clip_frames - 1) / 48))
    num_segments = int(rng.integers(min_segments, min_segments + MAX_STORY_SEGMENTS))
    story = generate_story(int(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop)), num_segments)
    frames = render_story(story, size)
    n = len(frames)
    starts_of_segments = [start for start, _ in segment_frame_ranges(num_segments)]
    cuts = [starts_of_segments[i] for i, seg in enumerate(story["segments"]) if i > 0 and seg["cut"]]
    count = max(1, round(CLIPS_PER_STORY_FRAMES * n / clip_frames))
    if max_clips is not None:
        count = min(count, max_clips)
    clips = []
    for _ in range(count):
        if cuts and rng.random() < cut_fraction:  # the cut lands at position 1 .. clip_frames - 1 of the clip
            b = cuts[int(rng.integers(len(cuts)))]
            lo, hi = max(0, b - clip_frames + 1), min(n - clip_frames, b - 1)
        else:
            lo, hi = 0, n - clip_frames
        start = int(rng.integers(lo, hi + 1))
        clips.append(frames[start:start + clip_frames])
    return clips


def render_clips(task: tuple) -> np.ndarray:
    """uint8 [count, clip_frames, H, W, 3] from fresh random stories; ``task`` = (seed, task_index, clip_frames,
    size, count). Deterministic in the task; a module-level function so worker processes can run it."""
    seed, task_index, clip_frames, size, count = task
    rng = np.random.default_rng([int(seed), int(task_index), 0x7A3])
    clips: list[np.ndarray] = []
    while len(clips) < count:
        clips.extend(story_clips(rng, clip_frames, size, max_clips=count - len(clips)))
    return np.stack(clips)


class ClipPool:
    """A ring of rendered clips on the training device; ``sample`` draws a random batch from it, ``refresh``
    replaces the oldest clips with whatever the renderers finished (workers > 0) or renders ``per_step``
    clips in this process (workers = 0)."""

    def __init__(self, capacity: int, clip_frames: int, size, device, *, seed: int, first_task: int, workers: int,
                 per_step: int, clips_per_task: int = 32):
        import torch

        self.capacity, self.clip_frames, self.size, self.device = capacity, clip_frames, size, device
        self.seed, self.next_task, self.workers, self.per_step = seed, first_task, workers, per_step
        self.clips_per_task = clips_per_task if workers > 0 else per_step
        self.clips = torch.empty((capacity, clip_frames, size[0], size[1], 3), dtype=torch.uint8, device=device)
        self.filled = 0  # valid entries (the ring is full after the first pass)
        self.cursor = 0  # next slot to overwrite (the oldest clip)
        self.received = 0  # clips received since the last ``take_received``
        self.pool = None
        self.pending = []
        self.allowance = 0  # new clips to ask the workers for (grows by ``per_step`` per refresh)
        if workers > 0:
            import multiprocessing as mp

            # spawn, not fork: this process holds CUDA and torch threads that fork would copy half-initialised
            self.pool = mp.get_context("spawn").Pool(workers)

    def _task(self, count: int) -> tuple:
        self.next_task += 1
        return (self.seed, self.next_task - 1, self.clip_frames, self.size, count)

    def _submit(self, filling: bool) -> None:
        # At most two tasks per worker in flight, and after the first fill only about ``per_step`` new clips per
        # step: more would cost this process (unpickling, copies) and the CPUs time without helping much.
        while len(self.pending) < 2 * self.workers and (filling or self.allowance > 0):
            self.pending.append(self.pool.apply_async(render_clips, (self._task(self.clips_per_task),)))
            self.allowance -= self.clips_per_task

    def _insert(self, clips: np.ndarray) -> None:
        import torch

        src = torch.from_numpy(clips)
        if self.device.type == "cuda":
            src = src.pin_memory()
        for chunk in src.split(self.capacity):
            n = min(len(chunk), self.capacity - self.cursor)
            self.clips[self.cursor:self.cursor + n].copy_(chunk[:n], non_blocking=True)
            if n < len(chunk):
                self.clips[:len(chunk) - n].copy_(chunk[n:], non_blocking=True)
            self.cursor = (self.cursor + len(chunk)) % self.capacity
            self.filled = min(self.capacity, self.filled + len(chunk))
            self.received += len(chunk)

    def refresh(self, block_until_full: bool = False) -> None:
        if self.pool is None:
            need = self.capacity - self.filled if block_until_full else self.per_step
            while need > 0:
                clips = render_clips(self._task(min(need, max(self.per_step, 1))))
                self._insert(clips)
                need -= len(clips)
            return
        filling = block_until_full and self.filled < self.capacity
        if not filling:
            self.allowance = min(self.allowance + self.per_step, 4 * self.workers * self.clips_per_task)
        t0 = time.perf_counter()
        while True:
            self._submit(filling)
            done = [r for r in self.pending if r.ready()]  # any order: one lost task must not block the rest
            for r in done:
                self.pending.remove(r)
                self._insert(r.get())
            if done:
                self._submit(filling)
            if not block_until_full or self.filled >= self.capacity:
                return
            if time.perf_counter() - t0 > FILL_TIMEOUT_S:
                raise RuntimeError(f"the {self.workers} renderer process(es) delivered {self.filled} of {self.capacity} "
                                   f"clips in {FILL_TIMEOUT_S} s; try fewer --workers or a smaller pool")
            self.pending[0].wait(0.05)

    def sample(self, batch_size: int, generator=None):
        import torch

        idx = torch.randint(self.filled, (batch_size,), device=self.device, generator=generator)
        return self.clips[idx]

    def take_received(self) -> int:
        n, self.received = self.received, 0
        return n

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --------------------------------------------------------------------------------------------------
# model, loss, metrics
# --------------------------------------------------------------------------------------------------
def vae_config(block_out_channels=None, latent_channels: int | None = None, size=DEFAULT_SIZE) -> dict:
    cfg = dict(VAE_CONFIG)
    if block_out_channels is not None:
        block_out_channels = tuple(int(c) for c in block_out_channels)
        if len(block_out_channels) != 4 or any(c <= 0 or c % cfg["norm_num_groups"] for c in block_out_channels):
            raise ValueError(f"block_out_channels {block_out_channels}: need 4 positive widths divisible by "
                             f"norm_num_groups={cfg['norm_num_groups']} (4 levels = 8x spatial compression)")
        cfg["block_out_channels"] = block_out_channels
    if latent_channels is not None:
        if int(latent_channels) <= 0:
            raise ValueError(f"latent_channels {latent_channels} must be positive")
        cfg["latent_channels"] = int(latent_channels)
    h, w = check_size(size)
    if h % 8 or w % 8:
        raise ValueError(f"frame size {h}x{w}: the VAE needs multiples of 8")
    cfg["sample_height"], cfg["sample_width"] = h, w
    return cfg


def build_vae(config: dict):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(**config)


def to_model_input(clips_uint8, dtype=None):
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1]."""
    import torch

    x = clips_uint8.permute(0, 4, 1, 2, 3).to(dtype or torch.float32)
    return x / 127.5 - 1.0


def palette_tensor(device):
    """[P, 3] palette colours in [-1, 1] (world.palette order) and a [P] bool mask of foreground colours."""
    import torch

    entries = list(palette().values())
    colours = torch.tensor([rgb for _, _, rgb in entries], dtype=torch.float32, device=device) / 127.5 - 1.0
    foreground = torch.tensor([role in FOREGROUND_ROLES for role, _, _ in entries], device=device)
    return colours, foreground


def nearest_palette(x, colours):
    """[B, 3, F, H, W] float -> [B, F, H, W] index of the nearest palette colour."""
    import torch

    # argmin |x - c|^2 = argmin (|c|^2 - 2 x.c); one [B, P, F, H, W] tensor instead of [B, P, 3, ...]
    dots = torch.einsum("bcfhw,pc->bpfhw", x.float(), colours)
    return ((colours * colours).sum(1).view(1, -1, 1, 1, 1) - 2 * dots).argmin(1)


def palette_counts(recon, target, colours, foreground):
    """[4] tensor: pixels whose nearest palette colour in ``recon`` equals the original's, all pixels, the same
    two for foreground pixels (the original is cat, mouse, cheese or scarf)."""
    import torch

    want = nearest_palette(target, colours)
    same = nearest_palette(recon, colours) == want
    fg = foreground[want]
    return torch.stack([same.sum(), torch.tensor(same.numel(), device=same.device), (same & fg).sum(), fg.sum()]).double()


def palette_accuracy(recon, target, colours, foreground) -> tuple[float, float]:
    """(all pixels, foreground pixels) palette accuracy; foreground is nan if the batch has none."""
    c = palette_counts(recon, target, colours, foreground).tolist()
    return c[0] / c[1], (c[2] / c[3] if c[3] else float("nan"))


def vae_losses(vae, x, kl_weight: float, autocast):
    """(loss, l1, mse, kl, recon) for one batch x [B, 3, F, H, W] in [-1, 1]; the decoder sees a posterior sample."""
    import torch

    with autocast():
        dist = vae.encode(x).latent_dist
    mean, logvar = dist.mean.float(), dist.logvar.float()
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    with autocast():
        recon = vae.decode(z).sample
    recon = recon.float()
    err = recon - x
    l1 = err.abs().mean()
    mse = (err * err).mean()
    kl = 0.5 * (mean * mean + logvar.exp() - 1.0 - logvar).mean()
    return l1 + mse + kl_weight * kl, l1, mse, kl, recon


def lr_factor(step: int, progress: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` over ``progress`` in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


# --------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON; nothing pickled)
# --------------------------------------------------------------------------------------------------
def _save_checkpoint(folder: Path, vae, optimizer, state: dict) -> None:
    from ..training.data import atomic_save_safetensors, atomic_write_text

    names = {id(p): n for n, p in vae.named_parameters()}
    moments = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                name = names[id(p)]
                moments[f"{name}.exp_avg"] = st["exp_avg"]
                moments[f"{name}.exp_avg_sq"] = st["exp_avg_sq"]
                moments[f"{name}.step"] = torch_tensor(st["step"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_save_safetensors({n: p.detach() for n, p in vae.state_dict().items()}, tmp / "model.safetensors")
    atomic_save_safetensors(moments, tmp / "optimizer.safetensors")
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def torch_tensor(value):
    import torch

    return value.detach().float().reshape(()).cpu() if isinstance(value, torch.Tensor) else torch.tensor(float(value))


def _find_checkpoint(partial: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old: killed while swapping in a new one
        c = partial / name
        if (c / "state.json").is_file() and (c / "model.safetensors").is_file():
            return c
    return None


def _load_checkpoint(folder: Path, vae, optimizer) -> dict:
    from ..training.data import load_safetensors

    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    weights = load_safetensors(folder / "model.safetensors")
    missing, unexpected = vae.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    moments = load_safetensors(folder / "optimizer.safetensors") if (folder / "optimizer.safetensors").is_file() else {}
    params = dict(vae.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    opt_state = {}
    for name, p in params.items():
        if f"{name}.exp_avg" in moments:
            opt_state[index[id(p)]] = {"step": moments[f"{name}.step"], "exp_avg": moments[f"{name}.exp_avg"],
                                       "exp_avg_sq": moments[f"{name}.exp_avg_sq"]}
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": opt_state, "param_groups": sd["param_groups"]})
    return state


# --------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------
def default_workers(device_type: str) -> int:
    """Renderer processes: all cores but two on a GPU machine (the training loop needs one); none on CPU,
    where rendering is ~1 % of a training step."""
    return max(1, min(14, (os.cpu_count() or 2) - 2)) if device_type == "cuda" else 0


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (a killed run logged them, then lost them)."""
    if not path.is_file():
        return
    from ..training.data import atomic_write_text

    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _evaluate(vae, clips_uint8, device, autocast, colours, foreground, batch_size: int) -> dict:
    """Posterior-mode latents and reconstructions of ``clips_uint8`` [N, F, H, W, 3]: latent mean / std / rms and
    recon L1 and palette accuracies."""
    import torch

    latents, l1_sum, counts = [], 0.0, 0.0
    vae.eval()
    with torch.no_grad():
        for chunk in clips_uint8.split(batch_size):
            x = to_model_input(chunk.to(device))
            with autocast():
                z = vae.encode(x).latent_dist.mode()
                recon = vae.decode(z).sample.float()
            latents.append(z.float().flatten().cpu())
            l1_sum += float((recon - x).abs().mean()) * len(chunk)
            counts = counts + palette_counts(recon, x, colours, foreground).cpu()
    vae.train()
    z = torch.cat(latents).double()
    c = counts.tolist()
    return {"latent_mean": float(z.mean()), "latent_std": float(z.std()), "latent_rms": float(z.pow(2).mean().sqrt()),
            "l1": l1_sum / len(clips_uint8), "palette_acc": c[0] / c[1], "fg_acc": c[2] / c[3] if c[3] else float("nan")}


def train_vae(out_dir, *, steps: int, batch_size: int, clip_frames: int = 17, lr: float = 2e-3,
              device: str = "auto", seed: int = 0, workers: int | None = None, log_every: int = 50,
              checkpoint_every: int = 500, max_minutes: float | None = None, resume: bool = False,
              force: bool = False, kl_weight: float = 1e-6, weight_decay: float = 0.01, grad_clip: float = 1.0,
              warmup_steps: int | None = None, pool_clips: int | None = None, block_out_channels=None,
              latent_channels: int | None = None, size=DEFAULT_SIZE, eval_clips: int = EVAL_CLIPS,
              print_fn=None) -> dict:
    """Train the toy-world VAE and save it to ``out_dir`` (a diffusers folder). Returns the summary dict.

    ``max_minutes`` ends training early when the wall time runs out (the cosine schedule follows whichever of
    steps and time is further along), so a fixed GPU budget always ends with a saved model. ``resume``
    continues ``<out_dir>.partial`` (or starts fresh if it holds no checkpoint); without it an existing
    partial run is refused unless ``force``. An existing ``out_dir`` is refused unless ``force`` (it is
    replaced only once the new model is complete).
    """
    import torch

    if print_fn is None:
        def print_fn(message):
            print(message, flush=True)
    t_start = time.perf_counter()
    out = Path(out_dir)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    steps, batch_size, log_every = int(steps), int(batch_size), max(1, int(log_every))
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    if lr <= 0:
        raise ValueError(f"lr {lr} must be positive")
    if seed < 0:
        raise ValueError(f"seed {seed} must be >= 0")
    clip_frames = check_clip_frames(clip_frames)
    size = check_size(size)
    cfg = vae_config(block_out_channels, latent_channels, size)
    from ..pipeline import resolve_device

    dev = resolve_device(device)
    if workers is None:
        workers = default_workers(dev.type)
    if workers < 0:
        raise ValueError(f"workers {workers} must be >= 0")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; use --force to replace it (it is replaced only when the new model is saved)")
    checkpoint = _find_checkpoint(partial) if partial.exists() else None
    if partial.exists() and not resume:
        if not force:
            raise FileExistsError(f"{partial} holds an unfinished run; use --resume to continue it or --force to start over")
        shutil.rmtree(partial)
        checkpoint = None
    partial.mkdir(parents=True, exist_ok=True)
    metrics_path = partial / METRICS_NAME

    torch.manual_seed(seed)
    vae = build_vae(cfg).to(dev).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    start_step, elapsed_before = 0, 0.0
    model_key = {"block_out_channels": list(cfg["block_out_channels"]), "latent_channels": cfg["latent_channels"],
                 "size": list(size)}
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, vae, optimizer)
        if state.get("model") != model_key:
            raise ValueError(f"{checkpoint} was made for {state.get('model')}, not {model_key}; use --force to start over")
        start_step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
        _trim_metrics(metrics_path, start_step)
        print_fn(f"resuming {partial} at step {start_step} ({_fmt_time(elapsed_before)} trained)")
    elif resume:
        print_fn(f"no checkpoint in {partial}; starting from step 0")
    if start_step >= steps:
        print_fn(f"checkpoint step {start_step} >= steps {steps}: finishing")
    warmup = int(warmup_steps) if warmup_steps is not None else min(200, max(1, steps // 20))
    max_seconds = None if max_minutes is None else float(max_minutes) * 60.0

    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv3d algorithms once

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    colours, foreground = palette_tensor(dev)
    capacity = int(pool_clips) if pool_clips else (min(8192, max(64, 64 * batch_size)) if workers else max(4 * batch_size, 16))
    capacity = max(capacity, batch_size)
    # tasks are numbered from the step so a resumed run draws new stories, not the ones it already saw
    pool = ClipPool(capacity, clip_frames, size, dev, seed=seed, first_task=start_step * 1000, workers=workers,
                    per_step=batch_size)
    gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + start_step)
    n_params = sum(p.numel() for p in params)
    print_fn(f"train-vae: {n_params / 1e6:.2f}M parameters, block_out_channels {tuple(cfg['block_out_channels'])}, "
             f"{cfg['latent_channels']} latent channels; {steps} steps x batch {batch_size} x {clip_frames} frames "
             f"at {size[0]}x{size[1]} on {dev}{' (bf16 autocast)' if cuda else ''}; lr {lr:g}, warm-up {warmup}; "
             f"{workers} render worker(s), pool {capacity} clips"
             + (f"; time limit {max_minutes:g} min" if max_seconds else "") + f"; writing {partial}")

    summary: dict = {}
    try:
        pool.refresh(block_until_full=True)
        pool.take_received()
        print_fn(f"clip pool filled in {time.perf_counter() - t_start:.1f} s")
        t_run = time.perf_counter()  # wall time of this process's training (plus elapsed_before)
        t_log, step_log = time.perf_counter(), start_step
        sums = None
        skipped = 0
        last = {}
        step = start_step
        stop_reason = "steps"
        while step < steps:
            elapsed = elapsed_before + time.perf_counter() - t_run
            if max_seconds is not None and elapsed >= max_seconds:
                stop_reason = "time"
                break
            progress = (step - warmup) / max(1, steps - warmup)
            if max_seconds is not None:
                progress = max(progress, elapsed / max_seconds)
            cur_lr = lr * lr_factor(step, progress, warmup)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            pool.refresh()
            x = to_model_input(pool.sample(batch_size, gen))
            loss, l1, mse, kl, recon = vae_losses(vae, x, kl_weight, autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if torch.isfinite(gnorm) and torch.isfinite(loss):
                optimizer.step()
            else:  # a bad batch (or an overflow) must not poison the weights
                skipped += 1
                if skipped > 50:
                    raise RuntimeError(f"{skipped} steps with a non-finite loss or gradient; stopping (lower --lr?)")
            step += 1
            vals = torch.stack([loss.detach(), l1.detach(), mse.detach(), kl.detach(), gnorm.detach().float()])
            sums = vals if sums is None else sums + vals
            if step % log_every == 0 or step == steps:
                acc, fg = palette_accuracy(recon.detach(), x, colours, foreground)
                n = step - step_log
                s = (sums / n).tolist()
                now = time.perf_counter()
                sec_per_step = (now - t_log) / n
                elapsed = elapsed_before + now - t_run
                eta = (steps - step) * sec_per_step
                if max_seconds is not None:
                    eta = min(eta, max(0.0, max_seconds - elapsed))
                fresh = pool.take_received() / (n * batch_size)
                last = {"step": step, "loss": s[0], "l1": s[1], "mse": s[2], "kl": s[3], "grad_norm": s[4],
                        "palette_acc": acc, "fg_acc": fg, "lr": cur_lr, "s_per_step": sec_per_step,
                        "new_clip_fraction": fresh, "elapsed_s": elapsed, "skipped": skipped}
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(last) + "\n")
                print_fn(f"step {step}/{steps} loss {s[0]:.4f} l1 {s[1]:.4f} kl {s[3]:.3g} acc {acc:.4f} fg {fg:.4f} "
                         f"lr {cur_lr:.2e} {sec_per_step:.3f} s/step new {min(fresh, 9.99):.2f} "
                         f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")
                sums, t_log, step_log = None, now, step
            if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                _save_checkpoint(partial / CHECKPOINT_DIR, vae, optimizer, {
                    "step": step, "elapsed_s": elapsed_before + time.perf_counter() - t_run, "model": model_key,
                    "seed": seed, "steps": steps, "batch_size": batch_size, "clip_frames": clip_frames, "lr": lr})
        train_seconds = elapsed_before + time.perf_counter() - t_run
    finally:
        pool.close()

    # scaling factor and final numbers from posterior modes of fresh training clips
    clips = torch.from_numpy(render_clips((seed, EVAL_TASK, clip_frames, size, max(1, int(eval_clips)))))
    ev = _evaluate(vae, clips, dev, autocast, colours, foreground, batch_size=min(16, max(1, batch_size)))
    if not math.isfinite(ev["latent_std"]) or ev["latent_std"] <= 0:
        raise RuntimeError(f"latent std {ev['latent_std']} is not usable for a scaling factor; the model diverged")
    scaling_factor = 1.0 / ev["latent_std"]
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.to("cpu").float().save_pretrained(str(partial), safe_serialization=True)
    summary = {
        "format": "ttt-video-toyworld-vae", "steps": step, "target_steps": steps, "stopped_by": stop_reason,
        "train_seconds": train_seconds, "batch_size": batch_size, "clip_frames": clip_frames, "lr": lr,
        "kl_weight": kl_weight, "seed": seed, "device": str(dev), "model": model_key, "parameters": n_params,
        "scaling_factor": scaling_factor, "eval": ev, "last_log": last,
    }
    from ..training.data import atomic_write_text

    atomic_write_text(partial / SUMMARY_NAME, json.dumps(summary, indent=1))
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".tmp"):
        shutil.rmtree(partial / name, ignore_errors=True)
    if out.exists():  # --force: swap the old model out only now that the new one is complete
        trash = out.with_name(out.name + ".replaced")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        os.replace(partial, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(partial, out)
    print_fn(f"done: {step} steps in {_fmt_time(train_seconds)} ({stop_reason}); eval over {len(clips)} clips: "
             f"L1 {ev['l1']:.4f}, palette accuracy {ev['palette_acc']:.4f} (foreground {ev['fg_acc']:.4f}), "
             f"latent mean {ev['latent_mean']:.3f} std {ev['latent_std']:.3f} -> scaling_factor "
             f"{scaling_factor:.4f}; saved {out}")
    return summary


# --------------------------------------------------------------------------------------------------
# CLI (``ttt-video toyworld train-vae``; registered by toyworld/cli.py)
# --------------------------------------------------------------------------------------------------
TRAIN_VAE_DESCRIPTION = """\
Train the toy world's CogVideoX VAE on clips rendered on the fly from training world seeds, and save it as
a diffusers folder (config.json + diffusion_pytorch_model.safetensors, scaling_factor = 1 / latent std).
Work in progress lives in OUT.partial/ (metrics.jsonl, a checkpoint every --checkpoint-every steps);
--resume continues it. See docs/toyworld.md, "Training the VAE".
"""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 4,8,16,32") from None


def add_train_vae_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output diffusers VAE folder")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, required=True, help="clips per step")
    p.add_argument("--clip-frames", type=int, default=17, help="frames per clip, 8m+1 (default 17 = 5 latent frames)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--workers", type=int, default=None,
                   help="renderer processes (default: cores - 2 up to 14 on CUDA, 0 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data (default 0)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training time (the schedule ends on time), then save")
    p.add_argument("--log-every", type=int, default=50, help="log a line every N steps (default 50)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps (default 500; 0 = never)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the mean KL term (default 1e-6)")
    p.add_argument("--block-out-channels", type=_int_list, default=None,
                   help="experiment: 4 widths, e.g. 4,8,16,32 (default: the settled config)")
    p.add_argument("--latent-channels", type=int, default=None, help="experiment: latent channels (default 8)")
    p.add_argument("--resume", action="store_true", help="continue OUT.partial from its checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing OUT / discard an unfinished OUT.partial")


def run_train_vae(args: argparse.Namespace) -> int:
    try:
        train_vae(args.out, steps=args.steps, batch_size=args.batch_size, clip_frames=args.clip_frames, lr=args.lr,
                  device=args.device, seed=args.seed, workers=args.workers, log_every=args.log_every,
                  checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes, resume=args.resume,
                  force=args.force, kl_weight=args.kl_weight, block_out_channels=args.block_out_channels,
                  latent_channels=args.latent_channels)
    except (OSError, ValueError) as e:
        print(f"ttt-video toyworld train-vae: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue from the last checkpoint with the same command and --resume "
              f"({args.out}{PARTIAL_SUFFIX})", file=sys.stderr)
        return 130
    return 0


__all__ = ["VAE_CONFIG", "ClipPool", "add_train_vae_arguments", "build_vae", "check_clip_frames", "palette_accuracy",
           "palette_counts", "palette_tensor", "render_clips", "run_train_vae", "story_clips", "to_model_input",
           "train_vae", "vae_config", "vae_losses"]
