"""Prepared data on disk (written by ``prepare``) and the deterministic sample stream the trainer reads.

Layout of a prepared dataset folder::

    dataset.json                      what every item shares (model pixel size, latent channels, VAE scaling
                                      factor, text length / width, fps, how it was made)
    manifest.jsonl                    one line per item: {"id", "vid_emb", "text_chunk_emb": [...],
                                      "num_segments", "texts", "source", "start_s"} (paths relative to it)
    latents/<id>.safetensors          "latent_dist" [F_lat, 2 C, h, w]: the VAE posterior (mean, logvar)
    text/<id>.<i>.safetensors         "text_emb" [L, D]: T5 embedding of segment i's text
    null_text.safetensors             "text_emb" [L, D]: T5 embedding of "" (for text_dropout_mode="empty_prompt")

As in the official pre-embedding dataset, the stored latent is the posterior (unregularised), and each read
draws ``mean + exp(logvar / 2) * noise`` and multiplies it by the VAE scaling factor (0.7 for CogVideoX-5B).

Sample stream: global sample position p = step * global_batch + j. Epoch e = p // N visits the items in a
permutation seeded by (seed, e). Every random choice that belongs to one sample (posterior draw, noise,
timestep, text dropout) comes from a generator seeded by (seed, step, j), so a run gives the same losses on
any number of processes and after a resume, with no data-loader state beyond the step counter.

Because a step's batch is a pure function of (seed, step, rank), ``BatchPrefetcher`` builds the next steps'
batches on a background thread while the current step runs (same samples, same randomness as building them
inline); an error there is raised again in the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..geometry import latent_frames_for_segments

MANIFEST_NAME = "manifest.jsonl"
DATASET_INFO_NAME = "dataset.json"
NULL_TEXT_NAME = "null_text.safetensors"
LATENT_KEY = "latent_dist"
TEXT_KEY = "text_emb"


# --------------------------------------------------------------------------------------------------
# atomic file writes
# --------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------
@dataclass
class ManifestItem:
    id: str
    vid_emb: Path  # absolute
    text_chunk_emb: list[Path]  # absolute, one per segment
    num_segments: int
    record: dict[str, Any]


def read_manifest_records(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
    return records


def write_manifest(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def load_manifest(path: str | Path) -> tuple[list[ManifestItem], dict[str, Any]]:
    """Items of a manifest (paths resolved against its folder) and the folder's dataset.json (or {})."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (run `ttt-video prepare` first)")
    root = path.parent
    info_path = root / DATASET_INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    items = []
    for n, rec in enumerate(read_manifest_records(path)):
        if "vid_emb" not in rec or "text_chunk_emb" not in rec:
            raise ValueError(f"{path}: record {n + 1} lacks 'vid_emb' or 'text_chunk_emb'")
        texts = [root / p if not os.path.isabs(p) else Path(p) for p in rec["text_chunk_emb"]]
        vid = Path(rec["vid_emb"])
        vid = vid if vid.is_absolute() else root / vid
        items.append(ManifestItem(rec.get("id", vid.stem), vid, texts, int(rec.get("num_segments", len(texts))), rec))
    return items, info


# --------------------------------------------------------------------------------------------------
# deterministic per-sample randomness
# --------------------------------------------------------------------------------------------------
def sample_generator(seed: int, step: int, position: int, salt: str = "") -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{step}:{position}:{salt}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=sample_generator(seed, -1, epoch, "epoch")).tolist()


# --------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------
class LatentVideoDataset:
    """Items of one stage (all with ``segments`` segments) of a prepared dataset."""

    def __init__(self, manifest: str | Path, segments: int, *, expect_channels: int | None = None,
                 expect_text: tuple[int, int] | None = None, sample_posterior: bool = True):  # fmt: skip
        items, info = load_manifest(manifest)
        self.info = info
        self.scaling_factor = float(info.get("scaling_factor", 1.0))
        self.sample_posterior = sample_posterior
        self.segments = segments
        wrong = [it for it in items if it.num_segments != segments]
        self.items = [it for it in items if it.num_segments == segments]
        self.skipped_other_lengths = len(wrong)
        if not self.items:
            lengths = sorted({it.num_segments for it in items})
            raise ValueError(
                f"{manifest}: no item has {segments} segment(s) ({3 * segments} s) as this stage needs; the "
                f"manifest holds {len(items)} item(s) with segment counts {lengths}. Prepare the data for this "
                f"stage with `ttt-video prepare ... --segments {segments}`"
            )
        self.latent_frames = latent_frames_for_segments(segments)
        self.expect_channels = expect_channels
        self.expect_text = expect_text
        root = Path(manifest)
        root = root if root.is_dir() else root.parent
        self.null_text_path = root / NULL_TEXT_NAME

    def __len__(self) -> int:
        return len(self.items)

    def null_text(self) -> torch.Tensor:
        if not self.null_text_path.is_file():
            raise FileNotFoundError(
                f"{self.null_text_path} is missing: text_dropout_mode='empty_prompt' needs the empty-prompt "
                "embedding that `ttt-video prepare` writes"
            )
        return load_safetensors(self.null_text_path)[TEXT_KEY].float()

    def load(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [F, C, h, w] float32 scaled, text [S, L, D] float32) of item ``index``."""
        item = self.items[index]
        dist = load_safetensors(item.vid_emb).get(LATENT_KEY)
        if dist is None:
            raise ValueError(f"{item.vid_emb}: no '{LATENT_KEY}' tensor")
        dist = dist.float()
        F_, C2 = dist.shape[0], dist.shape[1]
        if F_ != self.latent_frames or C2 % 2:
            raise ValueError(
                f"{item.vid_emb}: latent posterior has shape {tuple(dist.shape)}; a {self.segments}-segment item "
                f"needs [{self.latent_frames}, 2 x channels, h, w]"
            )
        mean, logvar = dist[:, : C2 // 2], dist[:, C2 // 2 :]
        if self.expect_channels is not None and mean.shape[1] != self.expect_channels:
            raise ValueError(f"{item.vid_emb}: {mean.shape[1]} latent channels, the model expects {self.expect_channels}")
        if self.sample_posterior:
            logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * noise
        else:
            latents = mean
        latents = latents * self.scaling_factor
        if len(item.text_chunk_emb) != self.segments:
            raise ValueError(f"item {item.id}: {len(item.text_chunk_emb)} text embeddings for {self.segments} segments")
        texts = []
        for p in item.text_chunk_emb:
            t = load_safetensors(p).get(TEXT_KEY)
            if t is None:
                raise ValueError(f"{p}: no '{TEXT_KEY}' tensor")
            if self.expect_text is not None and tuple(t.shape) != self.expect_text:
                raise ValueError(f"{p}: text embedding shape {tuple(t.shape)}, the model expects {self.expect_text}")
            texts.append(t.float())
        return latents, torch.stack(texts)


@dataclass
class SampleStream:
    """Which dataset item a global sample position is, for a fixed seed."""

    num_items: int
    seed: int

    def __post_init__(self):
        self._cache: dict[int, list[int]] = {}

    def item(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch not in self._cache:
            self._cache = {epoch: epoch_permutation(self.num_items, self.seed, epoch)}
        return self._cache[epoch][offset]


def drop_text(text: torch.Tensor, gen: torch.Generator, p: float, null_text: torch.Tensor | None) -> torch.Tensor:
    """With probability p, the whole video's text [S, L, D] becomes zeros (official ``dropout_txt``) or,
    given ``null_text`` [L, D], the empty prompt's embedding in every segment (classifier-free guidance)."""
    if torch.rand((), generator=gen).item() >= p:
        return text
    return null_text.expand_as(text).clone() if null_text is not None else torch.zeros_like(text)


# --------------------------------------------------------------------------------------------------
# step batches, built ahead of time
# --------------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """One forward/backward's inputs, on the host: latents / noise [B, F, C, h, w], text [B, S, L, D],
    timesteps [B] (int64)."""

    latents: torch.Tensor
    text: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor

    def pin_memory(self) -> "MicroBatch":
        return MicroBatch(*(t.pin_memory() for t in (self.latents, self.text, self.noise, self.timesteps)))

    def to(self, device: torch.device) -> "MicroBatch":
        # non_blocking from pinned memory: the copy overlaps the GPU's work; PyTorch keeps the pinned block
        # alive until the copy is done
        return MicroBatch(*(t.to(device, non_blocking=True) for t in (self.latents, self.text, self.noise, self.timesteps)))


@dataclass
class StepBatches:
    """Builds the micro-batches of one training step on one rank (a pure function of the step)."""

    dataset: LatentVideoDataset
    seed: int
    rank: int
    batch_size: int  # per micro-batch and rank
    accum_steps: int
    world_size: int
    text_dropout: float
    null_text: torch.Tensor | None
    num_train_timesteps: int

    def __post_init__(self):
        self.stream = SampleStream(len(self.dataset), self.seed)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.world_size

    def __call__(self, step: int) -> list[MicroBatch]:
        B, A = self.batch_size, self.accum_steps
        micro = []
        for m in range(A):
            lat, txt, noi, tt = [], [], [], []
            for b in range(B):
                j = self.rank * B * A + m * B + b  # index of this sample inside the global batch
                gen = sample_generator(self.seed, step, j)
                # the draw order from ``gen`` (posterior, timestep, noise, text dropout) defines the run
                latents, text = self.dataset.load(self.stream.item(step * self.global_batch + j), gen)
                t = torch.randint(0, self.num_train_timesteps, (1,), generator=gen)
                noise = torch.randn(latents.shape, generator=gen)
                text = drop_text(text, gen, self.text_dropout, self.null_text)
                lat.append(latents), txt.append(text), noi.append(noise), tt.append(t)
            micro.append(MicroBatch(torch.stack(lat), torch.stack(txt), torch.stack(noi), torch.cat(tt)))
        return micro


class BatchPrefetcher:
    """``make(step)`` for each of ``steps``, in order, on a background thread, up to ``depth`` steps ahead.

    ``get(step)`` returns the batch of that step (steps must be asked for in the order given). An exception
    in the thread is raised again by ``get`` (same exception, with a note saying where it came from), so
    the training loop stops with the loader's error instead of waiting forever. ``close()`` (or leaving the
    ``with`` block) stops the thread; it is a daemon, so it never keeps the process alive.

    ``pin``: page-lock each batch (``MicroBatch.pin_memory``) for asynchronous host-to-GPU copies;
    ``cuda_device``: the thread's current CUDA device (pinning otherwise opens a context on GPU 0 for every
    rank).
    """

    def __init__(self, make: Callable[[int], Any], steps: Iterable[int], *, depth: int = 2, pin: bool = False,
                 cuda_device: torch.device | None = None, name: str = "batch-prefetch"):  # fmt: skip
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._make = make
        self._steps = iter(steps)
        self._pin = pin
        self._cuda_device = cuda_device
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = None
        try:
            if self._cuda_device is not None:
                torch.cuda.set_device(self._cuda_device)
            for step in self._steps:
                if self._stop.is_set():
                    return
                batch = self._make(step)
                if self._pin:
                    batch = [mb.pin_memory() for mb in batch] if isinstance(batch, list) else batch.pin_memory()
                if not self._put((step, batch, None)):
                    return
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, which raises it
            self._put((step, None, err))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int):
        while True:
            try:
                got, batch, err = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    if self._stop.is_set():
                        raise RuntimeError("the batch prefetcher was closed") from None
                    raise RuntimeError(f"the batch prefetcher has no batch for step {step} (its steps ran out)") from None
        if err is not None:
            if hasattr(err, "add_note"):
                err.add_note(f"(raised in the data-loading thread while building the batch of step {got})")
            self.close()
            raise err
        if got != step:
            self.close()
            raise RuntimeError(f"batch prefetcher out of order: asked for step {step}, it made step {got}")
        return batch

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        while True:  # free the queue's batches (and wake a put that waits)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def host_threads_for_gpu_process(env: dict[str, str] | None = None) -> int | None:
    """torch's CPU (intra-op) thread count for a process that drives a GPU, or None to leave it alone.

    The host only assembles small batches and launches kernels; torch's default (one thread per core) in
    every process on the machine (torchrun ranks, trainings side by side) oversubscribes the cores, and a
    parallel region then waits for descheduled threads (measured on a busy 2-core host: batch assembly
    7 ms with 1 thread, 70-180 ms with 2). An explicit OMP_NUM_THREADS (torchrun sets 1 for several ranks)
    is left as it is.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cores // local))


# --------------------------------------------------------------------------------------------------
# writing (used by prepare, and by tests to make small datasets)
# --------------------------------------------------------------------------------------------------
def write_item(root: Path, item_id: str, latent_dist: torch.Tensor, text_embs: torch.Tensor,
               extra: dict[str, Any] | None = None, store_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:  # fmt: skip
    """Write one item's files atomically and return its manifest record (paths relative to ``root``).

    latent_dist [F_lat, 2 C, h, w] (posterior mean and log-variance), text_embs [S, L, D].
    """
    root = Path(root)
    vid_rel = f"latents/{item_id}.safetensors"
    atomic_save_safetensors({LATENT_KEY: latent_dist.to(store_dtype)}, root / vid_rel)
    text_rels = []
    for i, emb in enumerate(text_embs):
        rel = f"text/{item_id}.{i:02d}.safetensors"
        atomic_save_safetensors({TEXT_KEY: emb.to(store_dtype)}, root / rel)
        text_rels.append(rel)
    record = {"id": item_id, "vid_emb": vid_rel, "text_chunk_emb": text_rels, "num_segments": len(text_rels)}
    record.update(extra or {})
    return record


def write_dataset_info(root: Path, info: dict[str, Any]) -> None:
    atomic_write_text(Path(root) / DATASET_INFO_NAME, json.dumps(info, indent=1, sort_keys=True))
