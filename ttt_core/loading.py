"""Loading and saving TTT-DiT weights (safetensors only; nothing here ever unpickles a file).

Accepted inputs of ``load_ttt_dit(path_or_folder, ttt_weights=None, ...)``:

(a) a diffusers CogVideoX model folder (``<root>/transformer/config.json`` plus
    ``diffusion_pytorch_model.safetensors`` or ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` shards
    with ``diffusion_pytorch_model.safetensors.index.json``), or that ``transformer`` sub-folder itself;
(b) a single-file transformer ``.safetensors`` as ComfyUI users keep in ``models/diffusion_models/``
    (diffusers key names, optionally under a common prefix such as ``model.diffusion_model.``); its
    config comes from our safetensors metadata if we wrote the file, else from ``config=``, else it is
    inferred from tensor shapes (``infer_config``: what cannot be read from shapes is taken from the
    ``cogvideox-5b`` preset, and the warning says which fields);
(c) one combined file written by ``save_ttt_dit`` (config JSON in the safetensors metadata);
(d) files laid out with the official ttt-video-dit key names (``layers.{i}.seq_modeling_block...``, see
    ``OFFICIAL_BLOCK_KEYS``), converted to safetensors first (``convert_torch_checkpoint`` /
    docs/loading.md: their torch DCP / ``.pt`` checkpoints are pickles and are never opened here), or
    with ComfyUI's native CogVideoX names (``blocks.{i}.attn_out``..., ``COMFY_BLOCK_KEYS``).

``ttt_weights`` optionally names a second file holding the TTT parameters (and any backbone parameters the
trainer changed, e.g. the attention q/k/v/o of the later stages); its tensors replace those of the first
source. Without it, and when the CogVideoX weights carry no TTT parameters, the TTT layers and gates are
initialised freshly (seed ``TTT_INIT_SEED``) with a warning: a pre-trained CogVideoX is where fine-tuning
starts, but such a model does not generate well until it has been trained.

Errors: every problem with the keys (missing, unexpected, wrong shape) is reported at once by one
``StateDictMismatchError`` (first 10 of each kind + counts); files that are not complete safetensors files
(truncated, random bytes, pickles, torch zip files) and incomplete folders raise ``CheckpointFormatError``.
Both subclass ``LoadingError`` (a ``ValueError``).

Memory: the model is built with its parameters on the meta device and every tensor is read from the
file, converted to the requested dtype and placed on the target device one at a time, so loading the
5B model needs about one copy of the weights, not two.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .config import GLOBAL_LAYERS, TTTDiTConfig, preset

logger = logging.getLogger(__name__)

__all__ = [
    "LoadingError",
    "CheckpointFormatError",
    "StateDictMismatchError",
    "load_ttt_dit",
    "load_ttt_weights",
    "save_ttt_dit",
    "save_ttt_weights",
    "open_weights",
    "read_safetensors",
    "infer_config",
    "official_to_ours_key",
    "comfy_to_ours_key",
    "ours_to_official_key",
    "is_ttt_key",
    "convert_torch_checkpoint",
    "TTT_INIT_SEED",
    "OFFICIAL_TOP_KEYS",
    "OFFICIAL_BLOCK_KEYS",
]

TTT_INIT_SEED = 0  # fresh TTT parameters are drawn from this seed, so two loads give the same model
FORMAT_VERSION = "1"
META_KIND = "ttt_video.kind"  # "ttt_dit" (every parameter) or "ttt_weights" (a subset)
META_CONFIG = "ttt_video.config"  # TTTDiTConfig as JSON
META_VERSION = "ttt_video.format_version"
META_NAMES = "ttt_video.saved"  # what a subset file holds, in words
KIND_FULL, KIND_PARTIAL = "ttt_dit", "ttt_weights"

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
LIST_LIMIT = 10  # keys shown per kind in an error message

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}  # fmt: skip
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
class LoadingError(ValueError):
    """Something about the weights given to the loader is wrong (base of the errors below)."""


class CheckpointFormatError(LoadingError):
    """A file is not a complete safetensors file (truncated, corrupt, a pickle), or a folder lacks pieces."""


class StateDictMismatchError(LoadingError):
    """The weights do not fit the model: missing, unexpected and wrong-shaped keys, all listed at once."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple, tuple]],
        hints: list[str] | None = None,
    ):
        self.source, self.missing, self.unexpected, self.mismatched = source, missing, unexpected, mismatched
        self.hints = hints or []
        parts = [f"weights from {source} do not fit the model:"]
        if missing:
            parts.append(_listing(f"{len(missing)} missing key(s)", missing))
        if unexpected:
            parts.append(_listing(f"{len(unexpected)} unexpected key(s)", unexpected))
        if mismatched:
            shown = [f"{k}: file {list(f)} vs model {list(m)}" for k, f, m in mismatched]
            parts.append(_listing(f"{len(mismatched)} key(s) with the wrong shape", shown))
        parts += [f"hint: {h}" for h in self.hints]
        super().__init__("\n".join(parts))


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {x}" for x in items[:LIST_LIMIT])
    more = f"\n    ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    return f"  {title}:\n{shown}{more}"


# --------------------------------------------------------------------------------------------------
# safetensors files: validated header, lazy tensors
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRef:
    """One tensor inside a safetensors file, known from the header only (no data read yet)."""

    file: Path
    key: str  # name inside the file
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _describe_non_safetensors(head: bytes) -> str | None:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (e.g. a .ckpt/.pt/.bin torch checkpoint)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (the torch.save format, which holds a pickle)"
    if head[:1] == b"{":
        return "a JSON/text file"
    return None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Validate ``path`` as a complete safetensors file and return (tensors by key, metadata).

    Checks the 8-byte header length, the JSON header, every tensor's dtype / shape / byte range, and that
    the file is exactly as long as the header says (a truncated download fails here, naming both sizes).
    Never reads tensor data, never unpickles.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"weights file not found: {path}")
    if path.is_dir():
        raise CheckpointFormatError(f"{path} is a folder, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = int.from_bytes(head, "little")
        first = fh.read(1)
        # A safetensors file is recognised by its own structure first (a pickle's or zip's magic bytes can
        # also be the low bytes of a valid header length, e.g. 0x0280 = 640 starts with b"\x80\x02").
        if len(head) < 8 or not (2 <= header_len <= _MAX_HEADER_BYTES) or first != b"{":
            other = _describe_non_safetensors(head)
            if other:
                raise CheckpointFormatError(
                    f"{path} is not a safetensors file: it looks like {other}. Only safetensors files are loaded "
                    "(pickled checkpoints can run code when opened); see docs/loading.md or "
                    "`python -m ttt_video.ttt_core.loading convert` for converting torch checkpoints you trust."
                )
            if size < 8:
                raise CheckpointFormatError(f"{path} is only {size} bytes: not a safetensors file (empty or truncated)")
            raise CheckpointFormatError(
                f"{path} is not a safetensors file (its first 8 bytes give a header length of {header_len} bytes; "
                f"the file has {size} bytes)"
            )
        raw = first + fh.read(header_len - 1)
    if len(raw) < header_len:
        raise CheckpointFormatError(
            f"{path} is truncated: its safetensors header needs {header_len} bytes but the file has only "
            f"{size - 8} after the length field (incomplete download or copy?)"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointFormatError(f"{path} is not a safetensors file or its header is corrupt ({err})") from None

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{path}: corrupt safetensors metadata (must map strings to strings)")
    refs: dict[str, TensorRef] = {}
    data_end = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path}: corrupt safetensors header entry for {key!r}: {info!r}") from None
        if dtype not in _DTYPE_BYTES:
            raise CheckpointFormatError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * _DTYPE_BYTES[dtype] or start < 0:
            raise CheckpointFormatError(
                f"{path}: corrupt safetensors header: tensor {key!r} ({dtype} {list(shape)}) has byte range "
                f"[{start}, {end}), which does not match its size"
            )
        data_end = max(data_end, end)
        refs[key] = TensorRef(path, key, shape, dtype)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointFormatError(
            f"{path} is truncated: its header describes {expected} bytes of data but the file has {size} "
            "(incomplete download or copy?)"
        )
    if size > expected:
        raise CheckpointFormatError(
            f"{path} is corrupt: the file has {size} bytes but its safetensors header describes {expected}"
        )
    return refs, metadata


def read_safetensors(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validated eager read: (tensors, metadata); floating tensors converted to ``dtype`` if given."""
    refs, metadata = read_safetensors_header(path)
    out = {}
    with _Reader() as reader:
        for key, ref in refs.items():
            out[key] = reader.get(ref, dtype=dtype, device=device)
    return out, metadata


class _Reader:
    """Keeps one safetensors handle per file open while tensors are streamed out of them."""

    def __init__(self):
        self._handles: dict[Path, Any] = {}
        self._stack: list = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self._stack):
            ctx.__exit__(None, None, None)
        self._handles.clear()
        self._stack.clear()

    def get(self, ref: TensorRef, *, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        handle = self._handles.get(ref.file)
        try:
            if handle is None:
                ctx = safe_open(str(ref.file), framework="pt", device="cpu")
                handle = ctx.__enter__()
                self._stack.append(ctx)
                self._handles[ref.file] = handle
            tensor = handle.get_tensor(ref.key)
        except Exception as err:  # safetensors raises its own error types; name the file and key
            raise CheckpointFormatError(f"{ref.file}: cannot read tensor {ref.key!r} ({err})") from err
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device)


# --------------------------------------------------------------------------------------------------
# key layouts: prefixes, official ttt-video-dit names
# --------------------------------------------------------------------------------------------------
# Top-level module names of our (= diffusers') layout and of the official ttt-video-dit layout.
OURS_ROOTS = ("patch_embed", "time_embedding", "transformer_blocks", "norm_final", "norm_out", "proj_out")
OFFICIAL_ROOTS = ("patch_embedding", "time_embed", "layers", "transformer_norm", "final_layer")
# Groups of an official full training checkpoint (ttt/infra/checkpoint.py) other than the model.
OFFICIAL_NON_MODEL_GROUPS = ("optimizer", "lr_scheduler", "data_module", "metadata")
# Wrapper segments that torch.compile / FSDP1 / activation checkpointing insert into parameter names
# (anywhere), and DataParallel's leading "module.".
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# Official ttt-video-dit (ttt/models/cogvideo/dit.py, ttt/models/ssm/ttt_layer.py) -> ours. Read from their
# module definitions: DiffusionTransformer.{time_embed (Sequential Linear, SiLU, Linear), patch_embedding,
# layers, transformer_norm, final_layer}; TransformerLayer.{pre_seq_layernorm, pre_seq_adaLN_modulation
# (Sequential SiLU, Linear), seq_modeling_block, pre_mlp_layernorm, pre_mlp_adaLN_modulation, mlp};
# SeqModelingBlock.{q_norm, k_norm, q, k, v, o, ssm (TTTWrapper: .ttt = TTTMLP/TTTLinear),
# {forward,backward}_ssm_gating_{text,video} (SSMGating: .gating_alpha)}. Pure renames: the adaLN chunk
# orders (shift, scale, gate, text shift, text scale, text gate; final: shift, scale), the sinusoidal
# time embedding (cos first, dim = width), the (t h w) patch order, the (c p q) unpatchify order and the
# (h d) head split are the same in both, so no tensor is permuted. The TTT layer's own parameter names are
# the same in both (wq, wk, wv, wo, post_norm, ttt_norm_weight/bias, learnable_ttt_lr_weight/bias, W1, b1,
# W2, b2) with the same shapes.
OFFICIAL_TOP_KEYS: dict[str, str] = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "patch_embedding.vid_proj.": "patch_embed.proj.",
    "patch_embedding.text_proj.": "patch_embed.text_proj.",
    "transformer_norm.": "norm_final.",
    "final_layer.adaLN_modulation.1.": "norm_out.linear.",
    "final_layer.norm.": "norm_out.norm.",
    "final_layer.linear.": "proj_out.",
}
# Inside block i: official "layers.{i}." + key -> ours "transformer_blocks.{i}." + value. Keys ending in
# "." are prefixes (".weight"/".bias"/TTT names follow), the gate entries are whole names.
OFFICIAL_BLOCK_KEYS: dict[str, str] = {
    "pre_seq_layernorm.": "norm1.norm.",
    "pre_seq_adaLN_modulation.1.": "norm1.linear.",
    "seq_modeling_block.q_norm.": "attn1.norm_q.",
    "seq_modeling_block.k_norm.": "attn1.norm_k.",
    "seq_modeling_block.q.": "attn1.to_q.",
    "seq_modeling_block.k.": "attn1.to_k.",
    "seq_modeling_block.v.": "attn1.to_v.",
    "seq_modeling_block.o.": "attn1.to_out.0.",
    "seq_modeling_block.ssm.ttt.": "ttt.",
    "seq_modeling_block.forward_ssm_gating_text.gating_alpha": "ttt_gates.forward_text",
    "seq_modeling_block.forward_ssm_gating_video.gating_alpha": "ttt_gates.forward_video",
    "seq_modeling_block.backward_ssm_gating_text.gating_alpha": "ttt_gates.backward_text",
    "seq_modeling_block.backward_ssm_gating_video.gating_alpha": "ttt_gates.backward_video",
    "pre_mlp_layernorm.": "norm2.norm.",
    "pre_mlp_adaLN_modulation.1.": "norm2.linear.",
    "mlp.layer1.": "ff.net.0.proj.",
    "mlp.layer2.": "ff.net.2.",
}
_OFFICIAL_BLOCK_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

# ComfyUI's native CogVideoX (comfy/ldm/cogvideo/model.py), e.g. a model saved from a ComfyUI graph:
# the same tensors as diffusers under flattened names.
COMFY_ROOTS = ("patch_embed", "time_embedding_linear_1", "time_embedding_linear_2", "blocks", "norm_final",
               "norm_out", "proj_out")  # fmt: skip
COMFY_TOP_KEYS: dict[str, str] = {
    "time_embedding_linear_1.": "time_embedding.linear_1.",
    "time_embedding_linear_2.": "time_embedding.linear_2.",
    "patch_embed.": "patch_embed.",
    "norm_final.": "norm_final.",
    "norm_out.": "norm_out.",
    "proj_out.": "proj_out.",
}
COMFY_BLOCK_KEYS: dict[str, str] = {
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "q.": "attn1.to_q.",
    "k.": "attn1.to_k.",
    "v.": "attn1.to_v.",
    "norm_q.": "attn1.norm_q.",
    "norm_k.": "attn1.norm_k.",
    "attn_out.": "attn1.to_out.0.",
    "ff_proj.": "ff.net.0.proj.",
    "ff_out.": "ff.net.2.",
    "ttt.": "ttt.",  # a ComfyUI-side save of our own model would keep our TTT names
    "ttt_gates.": "ttt_gates.",
}
_COMFY_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_OURS_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    if key in table:
        return table[key]
    for src in sorted(table, key=len, reverse=True):  # longest prefix first ("q_norm." before "q.")
        if src.endswith(".") and key.startswith(src):
            return table[src] + key[len(src) :]
    return None


def official_to_ours_key(key: str) -> str | None:
    """Map one official ttt-video-dit model key to ours (None if it has no counterpart)."""
    m = _OFFICIAL_BLOCK_RE.match(key)
    if m:
        rest = _rename(m.group(2), OFFICIAL_BLOCK_KEYS)
        return None if rest is None else f"transformer_blocks.{m.group(1)}.{rest}"
    return _rename(key, OFFICIAL_TOP_KEYS)


def ours_to_official_key(key: str) -> str | None:
    """Inverse of ``official_to_ours_key`` (None for keys the official model does not have)."""
    m = _OURS_BLOCK_RE.match(key)
    if m:
        rest = _rename(m.group(2), {v: k for k, v in OFFICIAL_BLOCK_KEYS.items()})
        return None if rest is None else f"layers.{m.group(1)}.{rest}"
    return _rename(key, {v: k for k, v in OFFICIAL_TOP_KEYS.items()})


def is_ttt_key(key: str) -> bool:
    """True for the parameters the paper adds (TTT layers and gates) in our layout."""
    return ".ttt." in key or ".ttt_gates." in key


def _strip_wrappers(key: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        while key.startswith(seg):
            key = key[len(seg) :]
        key = key.replace("." + seg, ".")
    return key[len("module.") :] if key.startswith("module.") else key


def _root_position(key: str, roots: Iterable[str]) -> int | None:
    """Index where a known top-level module name starts in ``key`` (at a '.' boundary), else None."""
    best = None
    for root in roots:
        token = root + "."
        if key.startswith(token):
            return 0
        idx = key.find("." + token)
        if idx >= 0 and (best is None or idx + 1 < best):
            best = idx + 1
    return best


def comfy_to_ours_key(key: str) -> str | None:
    """Map one ComfyUI-native CogVideoX key (comfy/ldm/cogvideo/model.py) to ours (None if unknown)."""
    m = _COMFY_BLOCK_RE.match(key)
    if m:
        rest = _rename(m.group(2), COMFY_BLOCK_KEYS)
        return None if rest is None else f"transformer_blocks.{m.group(1)}.{rest}"
    return _rename(key, COMFY_TOP_KEYS)


# layout name -> (top-level module names, names that only this layout uses, key mapping to ours)
_LAYOUTS = {
    "ours": (OURS_ROOTS, ("time_embedding", "transformer_blocks"), None),
    "official": (OFFICIAL_ROOTS, OFFICIAL_ROOTS, official_to_ours_key),
    "comfy": (COMFY_ROOTS, ("time_embedding_linear_1", "time_embedding_linear_2", "blocks"), comfy_to_ours_key),
}
_LAYOUT_NOTES = {"official": "official ttt-video-dit", "comfy": "ComfyUI-native CogVideoX"}


def normalize_keys(refs: Mapping[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """Bring a state dict (values of any type) to our key names: drop wrapper segments, strip one common
    prefix (e.g. ``model.diffusion_model.``), drop an official training checkpoint's non-model groups, and
    rename official ttt-video-dit / ComfyUI-native keys. Returns (renamed mapping, notes for the user)."""
    notes: list[str] = []
    cleaned = {}
    dropped = 0
    for key, value in refs.items():
        if key.split(".", 1)[0] in OFFICIAL_NON_MODEL_GROUPS:
            dropped += 1  # optimizer / scheduler / sampler state of an official training checkpoint
            continue
        new = _strip_wrappers(key)
        if new in cleaned:
            raise CheckpointFormatError(f"{source}: keys {key!r} and another one both mean {new!r}")
        cleaned[new] = value
    if dropped:
        notes.append(f"ignored {dropped} non-model entries (optimizer / scheduler / data state)")

    # the layout whose own (unshared) module names occur most; ours on a tie
    votes = {name: sum(_root_position(k, unique) is not None for k in cleaned) for name, (_, unique, _) in _LAYOUTS.items()}
    layout = max(_LAYOUTS, key=lambda name: (votes[name], name == "ours"))
    roots, _, mapping = _LAYOUTS[layout]
    positions = {k: _root_position(k, roots) for k in cleaned}

    prefixes = Counter(k[:p] for k, p in positions.items() if p is not None)
    if not prefixes:
        return cleaned, notes  # nothing we recognise: the key check will list them as unexpected
    if len(prefixes) > 1:
        shown = ", ".join(repr(p) for p in list(prefixes)[:5])
        raise CheckpointFormatError(f"{source}: the model keys sit under different prefixes ({shown}); expected one")
    (prefix,) = prefixes
    out = {}
    for key, value in cleaned.items():
        if positions[key] is None or not key.startswith(prefix):
            out[key] = value  # unknown: reported as unexpected by the key check
            continue
        out[key[len(prefix) :]] = value
    if prefix:
        notes.append(f"stripped the key prefix {prefix!r}")
    if mapping is not None:
        renamed = {}
        for key, value in out.items():
            new = mapping(key)
            # keep unmappable keys under their original name so the error names what the file holds
            renamed[new if new is not None else key] = value
        out = renamed
        notes.append(f"mapped {_LAYOUT_NOTES[layout]} key names to ours")
    return out, notes


# --------------------------------------------------------------------------------------------------
# weight sources (lazy): folders and files
# --------------------------------------------------------------------------------------------------
@dataclass
class WeightSource:
    """Tensors under our key names (header-only refs), with what the files say about the model."""

    description: str
    refs: dict[str, TensorRef]
    config: dict[str, Any] | None = None  # our TTTDiTConfig dict or a diffusers config.json
    config_origin: str = ""
    kind: str = ""  # "diffusers-folder", "single-file", KIND_FULL, KIND_PARTIAL
    notes: list[str] = field(default_factory=list)

    @property
    def has_ttt(self) -> bool:
        return any(is_ttt_key(k) for k in self.refs)


def _find_diffusers_weights(folder: Path) -> tuple[Path | None, Path | None]:
    """(index json, single weights file) of a diffusers transformer folder, variants included."""
    index, single = folder / DIFFUSERS_INDEX, folder / DIFFUSERS_WEIGHTS
    if index.exists():
        return index, None
    if single.exists():
        return None, single
    # variants: diffusion_pytorch_model.fp16.safetensors(.index.json)
    indices = sorted(folder.glob("diffusion_pytorch_model.*.safetensors.index.json"))
    singles = sorted(p for p in folder.glob("diffusion_pytorch_model.*.safetensors") if "-of-" not in p.name)
    if len(indices) + len(singles) > 1:
        names = ", ".join(p.name for p in indices + singles)
        raise CheckpointFormatError(f"{folder} holds several weight variants ({names}); pass one file directly")
    if indices:
        return indices[0], None
    if singles:
        return None, singles[0]
    return None, None


def _open_diffusers_folder(folder: Path) -> WeightSource:
    root = folder
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    config_path = folder / "config.json"
    index, single = _find_diffusers_weights(folder)
    if not config_path.exists():
        has_weights = index is not None or single is not None
        raise CheckpointFormatError(
            f"{root} is not a diffusers CogVideoX folder: {config_path} is missing"
            + ("" if has_weights else f" and so are {DIFFUSERS_WEIGHTS} / {DIFFUSERS_INDEX}")
            + " (expected the model root with transformer/config.json, or the transformer sub-folder)"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointFormatError(f"{config_path} is not valid JSON ({err})") from None
    cls = config.get("_class_name")
    if cls not in (None, "CogVideoXTransformer3DModel"):
        raise CheckpointFormatError(f"{config_path} describes a {cls}, not a CogVideoXTransformer3DModel")

    refs: dict[str, TensorRef] = {}
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointFormatError(f"{index} is not a valid safetensors index ({err!r})") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (folder / s).exists()]
        if absent:
            raise CheckpointFormatError(
                f"{folder}: {len(absent)} of {len(shards)} shard(s) named in {index.name} are missing: "
                + ", ".join(absent[:LIST_LIMIT])
            )
        for shard in shards:
            shard_refs, _ = read_safetensors_header(folder / shard)
            listed = [k for k, s in weight_map.items() if s == shard]
            lost = [k for k in listed if k not in shard_refs]
            if lost:
                raise CheckpointFormatError(
                    f"{folder / shard} lacks {len(lost)} tensor(s) that {index.name} places there, e.g. {lost[:3]}"
                )
            refs.update(shard_refs)
        description = f"{folder} ({len(shards)} shards)"
    elif single is not None:
        refs, _ = read_safetensors_header(single)
        description = str(single)
    else:
        pickled = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.bin"))
        if pickled:
            raise CheckpointFormatError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}); only safetensors are loaded. "
                "Re-save them as safetensors (see docs/loading.md)"
            )
        raise CheckpointFormatError(f"{folder} has no {DIFFUSERS_WEIGHTS} and no {DIFFUSERS_INDEX}")
    renamed, notes = normalize_keys(refs, description)
    return WeightSource(description, renamed, config, str(config_path), "diffusers-folder", notes)


def _open_file(path: Path) -> WeightSource:
    refs, metadata = read_safetensors_header(path)
    renamed, notes = normalize_keys(refs, str(path))
    kind = metadata.get(META_KIND, "single-file")
    config = None
    if META_CONFIG in metadata:
        try:
            config = json.loads(metadata[META_CONFIG])
        except ValueError as err:
            raise CheckpointFormatError(f"{path}: corrupt config in the safetensors metadata ({err})") from None
    return WeightSource(str(path), renamed, config, f"{path} metadata" if config else "", kind, notes)


def _dcp_hint(path: Path) -> str:
    return (
        f"{path} looks like a torch distributed (DCP) checkpoint, the official ttt-video-dit format. It is "
        "made of pickles and is not opened here; convert it once with the commands in docs/loading.md "
        "(dcp_to_torch_save, then `python -m ttt_video.ttt_core.loading convert`)"
    )


def open_weights(path: str | os.PathLike) -> WeightSource:
    """Inspect a file or folder (headers only) and return its tensors under our key names."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointFormatError(f"weights not found: {path}")
    if path.is_dir():
        if (path / ".metadata").exists() or any(path.glob("*.distcp")):
            raise CheckpointFormatError(_dcp_hint(path))
        return _open_diffusers_folder(path)
    return _open_file(path)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
def infer_config(refs: Mapping[str, Any], base: str = "cogvideox-5b") -> tuple[TTTDiTConfig, list[str]]:
    """Infer a TTTDiTConfig from tensor shapes (refs: key -> anything with ``.shape``).

    Read from shapes: width, heads x head dim, layers, in/out channels, patch size, text width, time
    embedding width, and (if present) the TTT kind and MLP expansion. Not visible in weights and taken from
    the ``base`` preset: sample size, frames, text length, RoPE and the TTT hyper-parameters. Returns the
    config and one note per inferred / assumed group.
    """
    def shape(key):
        ref = refs.get(key)
        return None if ref is None else tuple(ref.shape)

    need = ["patch_embed.proj.weight", "patch_embed.text_proj.weight", "time_embedding.linear_1.weight",
            "transformer_blocks.0.attn1.norm_q.weight", "proj_out.weight"]  # fmt: skip
    absent = [k for k in need if shape(k) is None]
    if absent:
        raise LoadingError(
            "cannot infer the model configuration from the weights (no config given and the file has no "
            f"config metadata): missing {absent}. Pass config=preset(...) or a TTTDiTConfig"
        )
    proj = shape("patch_embed.proj.weight")
    if len(proj) != 4:
        raise LoadingError(
            f"patch_embed.proj.weight has shape {list(proj)}: a CogVideoX 1.5 (temporal patch) checkpoint, "
            "which is not supported"
        )
    width, in_channels, patch, _ = proj
    head_dim = shape("transformer_blocks.0.attn1.norm_q.weight")[0]
    layers = 1 + max(int(m.group(1)) for k in refs if (m := _OURS_BLOCK_RE.match(k)))
    out_features = shape("proj_out.weight")[0]
    fields = dict(
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        num_layers=layers,
        in_channels=in_channels,
        out_channels=out_features // (patch * patch),
        patch_size=patch,
        text_embed_dim=shape("patch_embed.text_proj.weight")[1],
        time_embed_dim=shape("time_embedding.linear_1.weight")[0],
    )
    if (width, fields["num_layers"], fields["text_embed_dim"]) == (1920, 30, 4096):
        raise LoadingError(
            "these weights look like CogVideoX-2B (width 1920, 30 layers), which uses sinusoidal positions, not "
            "the rotary embeddings TTTDiT needs; only CogVideoX-5B-style models are supported"
        )
    notes = ["inferred from tensor shapes: " + ", ".join(f"{k}={v}" for k, v in fields.items())]
    w1, w2 = shape("transformer_blocks.0.ttt.W1"), shape("transformer_blocks.0.ttt.W2")
    if w2 is not None and w1 is not None:
        fields.update(global_layer="ttt_mlp", mlp_expansion=w1[2] // head_dim)
        notes.append(f"TTT-MLP layers found (expansion {w1[2] // head_dim})")
    elif w1 is not None:
        fields.update(global_layer="ttt_linear")
        notes.append("TTT-Linear layers found")
    base_cfg = preset(base, **({"global_layer": fields["global_layer"]} if "global_layer" in fields else {}))
    cfg = TTTDiTConfig(**{**base_cfg.to_dict(), **fields})
    notes.append(
        f"not in the weights, taken from preset {base!r}: sample {cfg.sample_height}x{cfg.sample_width} latent, "
        f"{cfg.max_text_seq_length} text tokens, rotary embeddings, TTT hyper-parameters "
        f"(global_layer={cfg.global_layer}, mini_batch_size={cfg.mini_batch_size}, ttt_base_lr={cfg.ttt_base_lr})"
    )
    return cfg, notes


def _as_config(config: TTTDiTConfig | Mapping | str | None) -> TTTDiTConfig | None:
    if config is None or isinstance(config, TTTDiTConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, Mapping):
        return TTTDiTConfig.from_dict(dict(config))
    raise TypeError(f"config must be a TTTDiTConfig, a preset name or a dict, got {type(config).__name__}")


_TTT_FIELDS = ("global_layer", "mini_batch_size", "ttt_base_lr", "mlp_expansion", "rope_theta", "gate_init",
               "scan_checkpoint_group_size", "max_segments_trained", "ttt_backend")  # fmt: skip


def _resolve_config(source: WeightSource, ttt_source: WeightSource | None, config, global_layer) -> tuple[TTTDiTConfig, list[str]]:
    """Config precedence: explicit ``config`` > our metadata (combined file, then TTT file) > diffusers
    config.json (backbone) > shape inference. ``global_layer`` overrides the result's field."""
    notes: list[str] = []
    explicit = _as_config(config)
    if explicit is not None:
        cfg = explicit
        for src in (source, ttt_source):
            if src is not None and src.config is not None:
                theirs = TTTDiTConfig.from_dict(src.config)
                differ = [
                    f"{f}: {getattr(theirs, f)} -> {getattr(cfg, f)}"
                    for f in theirs.diffusers_kwargs()
                    if getattr(theirs, f) != getattr(cfg, f)
                ]
                if differ:
                    notes.append(f"config given explicitly overrides {src.config_origin}: " + "; ".join(differ))
        origin = "the config argument"
    elif source.config is not None:
        cfg = TTTDiTConfig.from_dict(source.config)
        origin = source.config_origin
        if source.kind == "diffusers-folder":
            # config.json has only the backbone; TTT settings from the TTT file's metadata, else defaults
            if ttt_source is not None and ttt_source.config is not None:
                theirs = TTTDiTConfig.from_dict(ttt_source.config)
                cfg = TTTDiTConfig(**{**cfg.to_dict(), **{f: getattr(theirs, f) for f in _TTT_FIELDS}})
                origin += f" + TTT settings from {ttt_source.config_origin}"
            else:
                inferred = _ttt_kind_from_keys({**source.refs, **(ttt_source.refs if ttt_source else {})}, cfg)
                if inferred is not None and inferred != cfg.global_layer:
                    cfg = _with_global_layer(cfg, inferred)
    elif ttt_source is not None and ttt_source.config is not None:
        cfg = TTTDiTConfig.from_dict(ttt_source.config)
        origin = ttt_source.config_origin
    else:
        cfg, inferred_notes = infer_config({**source.refs, **(ttt_source.refs if ttt_source else {})})
        notes += inferred_notes
        origin = "tensor shapes"
        warnings.warn(
            f"{source.description} carries no model configuration; " + "; ".join(inferred_notes)
            + ". Pass config=... to be explicit.",
            stacklevel=3,
        )
    if global_layer is not None and global_layer != cfg.global_layer:
        if global_layer not in GLOBAL_LAYERS:
            raise ValueError(f"global_layer must be one of {GLOBAL_LAYERS}, got {global_layer!r}")
        cfg = _with_global_layer(cfg, global_layer)
        origin += f", global_layer={global_layer!r}"
    notes.insert(0, f"config from {origin}")
    return cfg, notes


def _ttt_kind_from_keys(refs: Mapping[str, TensorRef], cfg: TTTDiTConfig) -> str | None:
    if "transformer_blocks.0.ttt.W2" in refs:
        return "ttt_mlp"
    if "transformer_blocks.0.ttt.W1" in refs:
        return "ttt_linear"
    return None


def _with_global_layer(cfg: TTTDiTConfig, global_layer: str) -> TTTDiTConfig:
    data = cfg.to_dict()
    data["global_layer"] = global_layer
    if global_layer == "ttt_linear" and cfg.global_layer == "ttt_mlp":
        data.update(ttt_base_lr=1.0, mini_batch_size=16)  # the paper's TTT-Linear settings
    elif global_layer == "ttt_mlp" and cfg.global_layer == "ttt_linear":
        data.update(ttt_base_lr=0.1, mini_batch_size=64)
    return TTTDiTConfig(**data)


# --------------------------------------------------------------------------------------------------
# building the model without initialising it
# --------------------------------------------------------------------------------------------------
_META_LOCK = threading.Lock()


@contextmanager
def _parameters_on_meta():
    """Inside, every registered parameter is moved to the meta device (buffers stay real, so any tables
    a module computes in __init__ survive); construction costs no memory and no random init. Patches
    nn.Module.register_parameter for the duration (under a lock; other threads building modules at the
    same moment would be affected, which loading in a UI's worker thread does not do)."""
    _META_LOCK.acquire()
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        _META_LOCK.release()


def _build_meta_model(cfg: TTTDiTConfig):
    from .dit import TTTDiT

    with _parameters_on_meta():
        return TTTDiT(cfg)


def _materialize(model: nn.Module, dtype: torch.dtype, device) -> None:
    """Give every meta parameter real (uninitialised) storage, keeping tied parameters tied."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                pdtype = dtype if param.dtype.is_floating_point else param.dtype
                made[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=pdtype, device=device), requires_grad=param.requires_grad
                )
            module._parameters[name] = made[id(param)]


def _owners(model: nn.Module, keys: Iterable[str]) -> list[nn.Module]:
    """Modules whose ``reset_parameters`` initialise the given parameters: for each key the outermost
    module that contains it and has a ``reset_parameters`` (the TTT layer and the gates for the TTT keys).
    Resetting a module also resets parameters of it that are loaded; that is harmless because the file's
    tensors are copied in afterwards."""
    resettable = [(prefix, m) for prefix, m in model.named_modules() if hasattr(m, "reset_parameters")]
    chosen: dict[str, nn.Module] = {}
    uncovered = []
    for key in keys:
        owner = next(((p, m) for p, m in resettable if p == "" or key.startswith(p + ".")), None)  # pre-order
        if owner is None:
            uncovered.append(key)
        else:
            chosen.setdefault(owner[0], owner[1])
    if uncovered:
        raise LoadingError(
            f"cannot initialise {len(uncovered)} missing parameter(s) (no enclosing module has reset_parameters), "
            f"e.g. {sorted(uncovered)[:3]}; supply them in the weights"
        )
    return list(chosen.values())


def _fresh_init(modules: list[nn.Module], dtype: torch.dtype, device) -> None:
    """Initialise modules on the CPU in float32 from TTT_INIT_SEED (the same values on every machine and
    for every dtype), then move them to the target device and dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TTT_INIT_SEED)
        for module in modules:
            module.to(device="cpu", dtype=torch.float32)
            module.reset_parameters()
            module.to(device=device, dtype=dtype)


_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}  # fmt: skip


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or a torch.dtype, got {dtype!r}")
    return _DTYPE_NAMES[name]


def _majority_float_dtype(refs: Iterable[TensorRef]) -> torch.dtype:
    """The checkpoint's dtype (by bytes); fp8 storage (ComfyUI fp8 files) is computed in bf16 instead."""
    counts: Counter = Counter()
    for ref in refs:
        dt = ref.torch_dtype
        if dt is not None and dt.is_floating_point:
            counts[dt] += ref.numel
    if not counts:
        return torch.float32
    dtype = counts.most_common(1)[0][0]
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


# --------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------
def load_ttt_dit(
    path_or_folder: str | os.PathLike,
    ttt_weights: str | os.PathLike | None = None,
    *,
    config: TTTDiTConfig | Mapping | str | None = None,
    global_layer: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
):
    """Build a ``TTTDiT`` and load its weights (see the module docstring for the accepted formats).

    Args:
        path_or_folder: diffusers CogVideoX folder (root or ``transformer``), single-file transformer
            ``.safetensors``, or a combined file from ``save_ttt_dit``; official key names are mapped.
        ttt_weights: optional second safetensors file (TTT parameters + changed backbone parameters,
            e.g. from ``save_ttt_weights``); its tensors replace those of the first source.
        config: ``TTTDiTConfig``, preset name or dict; overrides what the files say (a mismatch in
            shapes is then reported as wrong-shaped keys).
        global_layer: "ttt_mlp" | "ttt_linear" | "none", overriding the config's choice.
        dtype: parameter dtype (e.g. torch.bfloat16 / "float32"); default: the checkpoint's (majority) dtype.
        device: where the parameters are placed (each tensor goes there straight from the file).
        strict: if False, missing / wrong-shaped parameters keep a fresh initialisation and unexpected keys
            are ignored (with a warning) instead of raising ``StateDictMismatchError``.

    The model is returned in eval mode. TTT parameters missing from CogVideoX-only weights are initialised
    freshly from ``TTT_INIT_SEED`` with a warning.
    """
    dtype = _as_dtype(dtype)
    source = open_weights(path_or_folder)
    if source.kind == KIND_PARTIAL:
        raise LoadingError(
            f"{source.description} holds only TTT / fine-tuned parameters (written by save_ttt_weights); pass the "
            "CogVideoX weights first and this file as ttt_weights=..."
        )
    ttt_source = open_weights(ttt_weights) if ttt_weights is not None else None
    cfg, notes = _resolve_config(source, ttt_source, config, global_layer)
    notes = source.notes + (ttt_source.notes if ttt_source else []) + notes

    refs = dict(source.refs)
    description = source.description
    if ttt_source is not None:
        replaced = sum(k in refs for k in ttt_source.refs)
        refs.update(ttt_source.refs)
        description += f" + {ttt_source.description}"
        notes.append(f"{len(ttt_source.refs)} tensor(s) from {ttt_source.description} ({replaced} replace the first source's)")

    model = _build_meta_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in refs]
    unexpected = [k for k in refs if k not in expected]
    mismatched = [(k, refs[k].shape, expected[k]) for k in expected if k in refs and refs[k].shape != expected[k]]

    fresh_ttt: list[str] = []
    if not source.has_ttt and (ttt_source is None or not ttt_source.has_ttt) and cfg.global_layer != "none":
        fresh_ttt = [k for k in missing if is_ttt_key(k)]
        missing = [k for k in missing if not is_ttt_key(k)]
    if missing or unexpected or mismatched:
        hints = _mismatch_hints(cfg, missing, unexpected, mismatched, refs)
        if strict:
            raise StateDictMismatchError(description, missing, unexpected, mismatched, hints)
        warnings.warn(str(StateDictMismatchError(description, missing, unexpected, mismatched, hints))
                      + "\n(strict=False: missing / wrong-shaped parameters keep a fresh initialisation, "
                      "unexpected keys are ignored)", stacklevel=2)  # fmt: skip

    if dtype is None:
        dtype = _majority_float_dtype(refs[k] for k in expected if k in refs)
    _materialize(model, dtype, device)
    to_init = fresh_ttt + missing + [k for k, _, _ in mismatched]
    if to_init:
        _fresh_init(_owners(model, to_init), dtype, device)
    if fresh_ttt:
        warnings.warn(
            f"{description} has no TTT parameters: the {len(fresh_ttt)} TTT layer / gate tensors were initialised "
            f"freshly (seed {TTT_INIT_SEED}, global_layer={cfg.global_layer!r}). This is the starting point for "
            "fine-tuning; the model will not produce good long videos until its TTT layers are trained. "
            "Pass ttt_weights=... to load trained ones.",
            stacklevel=2,
        )

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    bad_shapes = {k for k, _, _ in mismatched}
    with _Reader() as reader, torch.no_grad():
        for key, ref in refs.items():
            if key not in expected or key in bad_shapes:
                continue
            target = params.get(key, buffers.get(key))
            target.copy_(reader.get(ref, dtype=target.dtype if target.is_floating_point() else None, device=target.device))
    for name, buf in buffers.items():  # computed buffers follow the parameters
        if buf.is_floating_point():
            buf.data = buf.data.to(device=device, dtype=dtype)
        else:
            buf.data = buf.data.to(device=device)
    for note in notes:
        logger.info("load_ttt_dit: %s", note)
    model.load_notes = notes  # what the loader inferred / assumed, for UIs and logs
    return model.eval()


def _mismatch_hints(cfg: TTTDiTConfig, missing, unexpected, mismatched, refs) -> list[str]:
    hints = []
    if unexpected and all(is_ttt_key(k) for k in unexpected) and cfg.global_layer == "none":
        hints.append("the weights have TTT layers but the model was built with global_layer='none'")
    if missing and all(is_ttt_key(k) for k in missing):
        kind = _ttt_kind_from_keys(refs, cfg)
        if kind and kind != cfg.global_layer:
            hints.append(f"the weights hold {kind} layers but the model was built with global_layer={cfg.global_layer!r}")
        else:
            hints.append("the TTT weights are incomplete; pass the full TTT weights file as ttt_weights=...")
    if any(not k.startswith(OURS_ROOTS) for k in unexpected):
        hints.append("some keys match no known layout (diffusers / ttt_video / official ttt-video-dit)")
    if mismatched:
        hints.append("wrong shapes usually mean the config does not match the weights (width, heads, layers, "
                     "global_layer / mlp_expansion); check config=...")  # fmt: skip
    return hints


def load_ttt_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> list[str]:
    """Load a TTT weights file (``save_ttt_weights``) into an existing model; returns the loaded keys.

    Every key of the file must exist in the model with the same shape (else one StateDictMismatchError);
    with ``strict`` the file must also cover all of the model's TTT parameters.
    """
    source = open_weights(path)
    expected = {k: v for k, v in model.state_dict().items()}
    unexpected = [k for k in source.refs if k not in expected]
    mismatched = [(k, r.shape, tuple(expected[k].shape)) for k, r in source.refs.items()
                  if k in expected and r.shape != tuple(expected[k].shape)]  # fmt: skip
    missing = [k for k in expected if is_ttt_key(k) and k not in source.refs] if strict else []
    if unexpected or mismatched or missing:
        raise StateDictMismatchError(source.description, missing, unexpected, mismatched)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    with _Reader() as reader, torch.no_grad():
        for key, ref in source.refs.items():
            target = params[key]
            target.copy_(reader.get(ref, dtype=target.dtype if target.is_floating_point() else None, device=target.device))
    return list(source.refs)


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------
def _detached_unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses shared / tied storage: tied
    parameters are written once per name and re-tied by the model on load)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        else:
            seen.add(storage)
        out[key] = t
    return out


def _atomic_write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, overwrite: bool) -> Path:
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # refuse to replace a file that appeared meanwhile: a hard link fails if path exists
                os.link(tmp, path)
                os.unlink(tmp)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _model_config(model: nn.Module) -> TTTDiTConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, TTTDiTConfig):
        raise TypeError(f"expected a TTTDiT (with a TTTDiTConfig .config), got {type(model).__name__}")
    return cfg


def save_ttt_dit(model: nn.Module, path: str | os.PathLike, *, only_trainable_or_ttt: bool = False,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write the model as one safetensors file with its config in the metadata (atomic: temp + rename).

    ``only_trainable_or_ttt`` keeps the TTT parameters and those with ``requires_grad`` (a file to load as
    ``ttt_weights`` on top of CogVideoX weights). Refuses to replace an existing file unless ``overwrite``.
    """
    cfg = _model_config(model)
    state = model.state_dict()
    kind = KIND_FULL
    if only_trainable_or_ttt:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if is_ttt_key(k) or k in trainable}
        kind = KIND_PARTIAL if len(state) < len(model.state_dict()) else KIND_FULL
        if not state:
            raise ValueError("nothing to save: the model has no TTT parameters and none require grad")
    metadata = {"format": "pt", META_KIND: kind, META_CONFIG: cfg.to_json(), META_VERSION: FORMAT_VERSION}
    if kind == KIND_PARTIAL:
        metadata[META_NAMES] = "TTT parameters + parameters with requires_grad"
    return _atomic_write(_detached_unshared(state), metadata, Path(path), overwrite)


def save_ttt_weights(model: nn.Module, path: str | os.PathLike, names: Iterable[str] | None = None, *,
                     overwrite: bool = False) -> Path:  # fmt: skip
    """Export the TTT parameters plus the backbone parameters the trainer changed (the inference export).

    ``names``: extra state-dict keys or fnmatch patterns (e.g. ``"transformer_blocks.*.attn1.to_*"``);
    every pattern must match something. The file loads as ``load_ttt_dit(cogvideox, ttt_weights=path)``.
    """
    cfg = _model_config(model)
    state = model.state_dict()
    chosen = [k for k in state if is_ttt_key(k)]
    extra = list(names or [])
    for pattern in extra:
        hits = [k for k in state if fnmatch.fnmatchcase(k, pattern)]
        if not hits:
            raise KeyError(f"save_ttt_weights: {pattern!r} matches no parameter of the model")
        chosen += [k for k in hits if k not in chosen]
    if not chosen:
        raise ValueError("nothing to save: the model has no TTT parameters (global_layer='none') and no names given")
    metadata = {
        "format": "pt",
        META_KIND: KIND_PARTIAL,
        META_CONFIG: cfg.to_json(),
        META_VERSION: FORMAT_VERSION,
        META_NAMES: json.dumps(["<ttt>"] + extra),
    }
    return _atomic_write(_detached_unshared({k: state[k] for k in chosen}), metadata, Path(path), overwrite)


# --------------------------------------------------------------------------------------------------
# converting torch checkpoints (explicit, user-initiated; restricted unpickler only)
# --------------------------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def convert_torch_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a torch ``.pt`` / ``.pth`` / ``.ckpt`` file of tensors to safetensors.

    Reads with ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors, dicts and plain
    values, no code); a file that needs anything else is refused. Nested dicts are flattened with '.', a
    ``model`` / ``state_dict`` entry is taken as the model, non-tensor entries are dropped. Key names are
    kept (official ttt-video-dit names are mapped when the result is loaded).
    """
    src, dst = Path(src), Path(dst)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointFormatError(
            f"{src} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: {err}); "
            "it is not converted (a full unpickle could run code)"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = {k: v for k, v in _flatten(obj) if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError(f"{src} holds no tensors")
    metadata = {"format": "pt", "ttt_video.converted_from": src.name}
    return _atomic_write(_detached_unshared(tensors), metadata, dst, overwrite)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ttt_video.ttt_core.loading", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="torch .pt/.pth/.ckpt (weights_only) -> safetensors")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--overwrite", action="store_true")
    info = sub.add_parser("inspect", help="describe a weights file or folder (headers only)")
    info.add_argument("path")
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        print(convert_torch_checkpoint(args.src, args.dst, overwrite=args.overwrite))
        return 0
    source = open_weights(args.path)
    print(f"{source.description}: {len(source.refs)} tensors, kind {source.kind}, TTT: {source.has_ttt}")
    for note in source.notes:
        print(f"  {note}")
    if source.config:
        print(f"  config from {source.config_origin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
