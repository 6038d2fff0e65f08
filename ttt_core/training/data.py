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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
