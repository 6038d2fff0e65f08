"""Per-segment T5 text embeddings, as CogVideoX and the official TTT sampler compute them.

``SegmentTextEncoder`` loads the ``tokenizer/`` and ``text_encoder/`` sub-folders of a CogVideoX-format
(diffusers) folder with transformers (safetensors weights only, local files only) and turns a list of
segment prompts into one embedding per segment, ``[S, max_length, dim]``, each padded to ``max_length``
tokens (CogVideoX: 226) exactly like CogVideoX / the official code: ``padding="max_length"``,
truncation, the end-of-text token appended, and no attention mask passed to the encoder (pad tokens are
encoded too; the DiT was trained on such embeddings).

Scene tokens: ``<end_scene>`` and ``<start_scene>`` are added as special tokens when the tokenizer lacks
them, in that order (the official order, so with CogVideoX's T5 they get ids 32100 / 32101). If the
tokenizer then has more ids than the embedding has rows, the embedding is grown and the new rows are
drawn from a fixed-seed generator (deterministic; ``save_pretrained`` stores them). With CogVideoX's T5
no rows are added: its embedding has 32,128 rows, so the two ids land on existing rows. The official code
calls ``resize_token_embeddings(len(tokenizer))``, which *shrinks* that embedding to 32,102 rows; rows
32100 / 32101 are the same either way, so we skip the shrink and the embeddings are identical.

Truncation is reported, never silent: ``encode`` warns (or raises, ``on_overflow="error"``) naming each
segment whose prompt is longer than the budget, and records it in ``last_truncated``.

The model is loaded lazily (``count_tokens`` and cache hits need only the tokenizer) and ``free()``
releases it; a later ``encode`` loads it again. ``encode_cached`` keeps embeddings on disk as safetensors,
keyed by the model identity (see ``model_id``) and a hash of the text.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .storyboard import SCENE_END_TOKEN, SCENE_START_TOKEN

logger = logging.getLogger(__name__)

SCENE_TOKENS = (SCENE_END_TOKEN, SCENE_START_TOKEN)  # official order of addition
DEFAULT_MAX_LENGTH = 226
NEW_ROW_SEED = 1_000_003  # seed of the rows added for missing scene tokens
_SMALL_FILE = 64 * 1024 * 1024  # weight files up to this size are content-hashed for the model id
_CACHE_FORMAT = "ttt-text-emb-v1"


class TextTruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's token budget and was cut."""


class SegmentTextEncoder:
    """T5 tokenizer + encoder that embeds one prompt per 3-s segment.

    Use :meth:`from_pretrained`. Attributes: ``tokenizer``, ``model_root``, ``device``, ``dtype``,
    ``model_id`` (hex identity used by the cache), ``dim`` (embedding width), ``last_truncated``
    (``[(segment_index, num_tokens)]`` of the last ``encode``).
    """

    def __init__(self, tokenizer, encoder_dir: Path, model_root: Path, device, dtype, model_id: str, dim: int):
        self.tokenizer = tokenizer
        self.encoder_dir = encoder_dir
        self.model_root = model_root
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_id = model_id
        self.dim = dim
        self.added_tokens: list[str] = []
        self.last_truncated: list[tuple[int, int]] = []
        self._model = None

    # ---------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(
        cls,
        model_root: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        tokenizer_subfolder: str = "tokenizer",
        encoder_subfolder: str = "text_encoder",
        lazy: bool = True,
    ) -> "SegmentTextEncoder":
        """Load from a CogVideoX-format folder (``model_root/tokenizer``, ``model_root/text_encoder``).

        ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere. With ``lazy`` (default) the T5
        weights are read on the first ``encode`` that needs them."""
        from transformers import AddedToken, AutoTokenizer

        root = Path(model_root)
        tok_dir, enc_dir = root / tokenizer_subfolder, root / encoder_subfolder
        for d, what in ((tok_dir, "tokenizer"), (enc_dir, "text encoder")):
            if not d.is_dir():
                raise FileNotFoundError(f"{what} folder not found: {d} (expected a CogVideoX-format model folder)")
        if not (enc_dir / "config.json").is_file():
            raise FileNotFoundError(f"{enc_dir / 'config.json'} is missing")
        weights = _weight_files(enc_dir)
        if not weights:
            others = sorted(p.name for p in enc_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found {', '.join(others)}: convert them to safetensors; pickled weights are not loaded)" if others else ""
            raise FileNotFoundError(f"no .safetensors weights in {enc_dir}{hint}")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        # count_tokens measures long texts on purpose; we report overflows ourselves, so silence
        # transformers' generic "longer than the specified maximum sequence length" notice.
        if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
            tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        vocab = tokenizer.get_vocab()
        missing = [t for t in SCENE_TOKENS if t not in vocab]
        if missing:
            # add_tokens(special_tokens=True) works the same in transformers 4 and 5 (add_special_tokens'
            # keyword for keeping the existing extra tokens was renamed between them).
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)

        config = json.loads((enc_dir / "config.json").read_text())
        dim = int(config.get("d_model") or config.get("hidden_size"))
        identity = _model_identity(tok_dir, enc_dir, weights, len(tokenizer), missing)
        enc = cls(tokenizer, enc_dir, root, device, dtype, identity, dim)
        enc.added_tokens = missing
        if not lazy:
            enc._ensure_model()
        return enc

    def _ensure_model(self):
        if self._model is not None:
            return self._model
        from transformers import T5EncoderModel

        try:
            model = T5EncoderModel.from_pretrained(
                str(self.encoder_dir), local_files_only=True, use_safetensors=True, dtype=self.dtype
            )
        except TypeError:  # transformers 4 calls it torch_dtype
            model = T5EncoderModel.from_pretrained(
                str(self.encoder_dir), local_files_only=True, use_safetensors=True, torch_dtype=self.dtype
            )
        rows = model.get_input_embeddings().weight.shape[0]
        need = len(self.tokenizer)
        if need > rows:
            emb = model.resize_token_embeddings(need, mean_resizing=False)
            with torch.no_grad():
                old = emb.weight[:rows].float()
                g = torch.Generator().manual_seed(NEW_ROW_SEED)
                new = torch.randn(need - rows, emb.weight.shape[1], generator=g) * old.std() + old.mean()
                emb.weight[rows:] = new.to(emb.weight.dtype)
            logger.info("text encoder: added %d embedding rows for %s (seed %d)", need - rows, self.added_tokens, NEW_ROW_SEED)
        self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def free(self) -> None:
        """Release the T5 weights (RAM / VRAM). The tokenizer stays; a later ``encode`` reloads."""
        if self._model is None:
            return
        on_cuda = next(self._model.parameters()).is_cuda
        self._model = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    def save_pretrained(self, model_root: str | os.PathLike) -> None:
        """Write ``tokenizer/`` and ``text_encoder/`` (safetensors), including any added scene-token rows."""
        root = Path(model_root)
        self.tokenizer.save_pretrained(str(root / "tokenizer"))
        self._ensure_model().save_pretrained(str(root / "text_encoder"), safe_serialization=True)

    # ---------------------------------------------------------------------------------------------
    # tokens

    def count_tokens(self, text: str) -> int:
        """Tokens the text takes in the budget, including the end-of-text token (untruncated)."""
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    def tokenize(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> tuple[torch.Tensor, list[int]]:
        """(input ids [S, max_length] padded/truncated like CogVideoX, untruncated token counts)."""
        texts = _as_list(texts)
        counts = [self.count_tokens(t) for t in texts]
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )["input_ids"]
        return ids, counts

    # ---------------------------------------------------------------------------------------------
    # encoding

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        max_length: int = DEFAULT_MAX_LENGTH,
        *,
        on_overflow: str = "warn",
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Embed each text: ``[S, max_length, dim]`` in ``self.dtype`` on ``self.device``.

        ``on_overflow``: "warn" (default; TextTruncationWarning naming the segments), "error"
        (ValueError) or "ignore", for texts longer than ``max_length`` tokens."""
        texts = _as_list(texts)
        ids, counts = self.tokenize(texts, max_length)
        self._report_overflow(counts, max_length, on_overflow)
        model = self._ensure_model()
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = ids[start : start + batch_size].to(self.device)
            # No attention mask, as CogVideoX and the official sampler.
            out.append(model(input_ids=chunk).last_hidden_state.to(self.dtype))
        return torch.cat(out, dim=0)

    def _report_overflow(self, counts: list[int], max_length: int, on_overflow: str) -> None:
        if on_overflow not in ("warn", "error", "ignore"):
            raise ValueError(f"on_overflow must be warn, error or ignore, got {on_overflow!r}")
        self.last_truncated = [(i, n) for i, n in enumerate(counts) if n > max_length]
        if not self.last_truncated or on_overflow == "ignore":
            return
        detail = ", ".join(f"segment {i + 1}: {n} tokens ({n - max_length} cut)" for i, n in self.last_truncated)
        msg = f"text longer than the {max_length}-token budget; {detail}"
        if on_overflow == "error":
            raise ValueError(msg)
        warnings.warn(msg, TextTruncationWarning, stacklevel=3)

    def cache_key(self, text: str, max_length: int = DEFAULT_MAX_LENGTH) -> str:
        h = hashlib.sha256()
        for part in (_CACHE_FORMAT, self.model_id, str(max_length), str(self.dtype), text):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def cache_path(self, cache_dir: str | os.PathLike, text: str, max_length: int = DEFAULT_MAX_LENGTH) -> Path:
        return Path(cache_dir) / self.model_id[:16] / f"{self.cache_key(text, max_length)}.safetensors"

    def encode_cached(
        self,
        texts: Sequence[str],
        cache_dir: str | os.PathLike,
        max_length: int = DEFAULT_MAX_LENGTH,
        *,
        on_overflow: str = "warn",
    ) -> torch.Tensor:
        """``encode`` through an on-disk cache: texts already embedded by this model (same
        ``model_id``, ``max_length`` and dtype) are read back; the rest are encoded (loading the model
        only then) and written atomically. Returns ``[S, max_length, dim]`` on ``self.device``."""
        from safetensors.torch import load_file

        texts = _as_list(texts)
        counts = [self.count_tokens(t) for t in texts]
        self._report_overflow(counts, max_length, on_overflow)
        result: list[torch.Tensor | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            path = self.cache_path(cache_dir, t, max_length)
            if path.is_file():
                try:
                    emb = load_file(str(path))["embedding"]
                    if tuple(emb.shape) == (max_length, self.dim) and emb.dtype == self.dtype:
                        result[i] = emb
                        continue
                    logger.warning("ignoring cached text embedding with the wrong shape/dtype: %s", path)
                except Exception as e:  # a truncated or foreign file: recompute and overwrite
                    logger.warning("ignoring unreadable cached text embedding %s (%s)", path, e)
            todo.setdefault(t, []).append(i)
        if todo:
            unique = list(todo)
            truncated = self.last_truncated
            fresh = self.encode(unique, max_length, on_overflow="ignore").cpu()
            self.last_truncated = truncated  # indices into ``texts``, not into ``unique``
            for t, emb in zip(unique, fresh):
                _save_atomic(
                    self.cache_path(cache_dir, t, max_length),
                    emb.contiguous(),
                    {"format": _CACHE_FORMAT, "model_id": self.model_id, "max_length": str(max_length)},
                )
                for i in todo[t]:
                    result[i] = emb
        return torch.stack([r.to(self.dtype) for r in result]).to(self.device)


# -------------------------------------------------------------------------------------------------


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")
    return texts


def _weight_files(enc_dir: Path) -> list[Path]:
    return sorted(enc_dir.glob("*.safetensors"))


def _model_identity(tok_dir: Path, enc_dir: Path, weights: list[Path], vocab_len: int, added: list[str]) -> str:
    """A hash that changes when the tokenizer, config or weights change: small files by content, large
    weight files (T5-XXL is ~10 GB) by name, size and modification time."""
    h = hashlib.sha256(b"SegmentTextEncoder-v1\0")
    for p in sorted(tok_dir.iterdir()):
        if p.is_file():
            h.update(f"tok:{p.name}\0".encode())
            h.update(p.read_bytes())
    h.update((enc_dir / "config.json").read_bytes())
    for p in weights + sorted(enc_dir.glob("*.index.json")):
        st = p.stat()
        if st.st_size <= _SMALL_FILE:
            h.update(f"w:{p.name}:{st.st_size}\0".encode())
            h.update(p.read_bytes())
        else:
            h.update(f"w:{p.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    h.update(f"vocab:{vocab_len}:added:{','.join(added)}:seed:{NEW_ROW_SEED}".encode())
    return h.hexdigest()


def _save_atomic(path: Path, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({"embedding": tensor}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["SCENE_END_TOKEN", "SCENE_START_TOKEN", "SegmentTextEncoder", "TextTruncationWarning"]
