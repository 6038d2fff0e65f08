"""TTT-DiT configuration and presets.

``TTTDiTConfig`` holds the CogVideoX transformer settings (passed unchanged to diffusers'
``CogVideoXTransformer3DModel`` pieces) plus what the TTT paper adds. Presets:

- ``cogvideox-5b``: the paper's backbone (width 3072 = 48 heads x 64, 42 layers, patch 2, T5 dim 4096,
  720x480 -> 60x90 latent, 1,350 tokens per latent frame), TTT-MLP, mini-batch 64.
- ``tiny``: a few-thousand-parameter model for unit tests.
- ``toyworld``: the embedded default trained on the toy world (docs/toyworld.md): 2 heads x 64, 6 layers,
  3.3M parameters, fast enough for a one-minute video on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .geometry import VideoGeometry

GLOBAL_LAYERS = ("ttt_mlp", "ttt_linear", "none")


@dataclass
class TTTDiTConfig:
    # --- CogVideoX transformer (diffusers CogVideoXTransformer3DModel arguments) ---------------------
    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 42
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90  # latent width
    sample_height: int = 60  # latent height
    sample_frames: int = 49  # pixel frames of one 3-s segment
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226  # text tokens per segment
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = True
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    # --- TTT additions ----------------------------------------------------------------------------
    global_layer: str = "ttt_mlp"  # "ttt_mlp" | "ttt_linear" | "none"
    mini_batch_size: int = 64  # 64 for TTT-MLP, 16 for TTT-Linear (paper training configs)
    ttt_base_lr: float = 0.1  # 0.1 for TTT-MLP, 1.0 for TTT-Linear
    mlp_expansion: int = 4  # TTT-MLP hidden width = 4 x head_dim
    rope_theta: float = 10000.0
    gate_init: float = 0.1
    scan_checkpoint_group_size: int = 16  # rematerialise the TTT scan every G mini-batches in training
    max_segments_trained: int = 21  # longest video the weights were trained for (warn beyond)
    ttt_backend: str = "auto"  # "auto" | "torch" | "triton"

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.global_layer not in GLOBAL_LAYERS:
            raise ValueError(f"global_layer must be one of {GLOBAL_LAYERS}, got {self.global_layer!r}")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def geometry(self, num_segments: int) -> VideoGeometry:
        return VideoGeometry(
            num_segments=num_segments,
            latent_height=self.sample_height,
            latent_width=self.sample_width,
            patch_size=self.patch_size,
            text_tokens_per_segment=self.max_text_seq_length,
        )

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Arguments for diffusers' ``CogVideoXTransformer3DModel`` with the same backbone."""
        names = {f.name for f in dataclasses.fields(self)} - _TTT_FIELDS
        return {n: getattr(self, n) for n in sorted(names)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False) -> "TTTDiTConfig":
        """Build from our own dict or a diffusers transformer config.json (unknown keys such as
        ``_class_name`` or ``ofs_embed_dim`` are ignored unless ``strict``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if strict and unknown:
            raise ValueError(f"unknown TTTDiTConfig fields: {unknown}")
        if data.get("ofs_embed_dim") not in (None, 0):
            raise ValueError("CogVideoX 1.5 image-to-video configs (ofs_embed_dim) are not supported")
        if data.get("patch_size_t") not in (None, 0, 1):
            raise ValueError("temporal patching (patch_size_t, CogVideoX 1.5) is not supported")
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = kwargs.get("in_channels", cls.in_channels)
        return cls(**kwargs)


_TTT_FIELDS = {
    "global_layer",
    "mini_batch_size",
    "ttt_base_lr",
    "mlp_expansion",
    "rope_theta",
    "gate_init",
    "scan_checkpoint_group_size",
    "max_segments_trained",
    "ttt_backend",
    "extra",
}


def preset(name: str, **overrides: Any) -> TTTDiTConfig:
    """Named configuration; keyword overrides replace single fields (e.g. global_layer="none")."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = dict(PRESETS[name])
    if overrides.get("global_layer") == "ttt_linear" and "ttt_base_lr" not in overrides:
        base["ttt_base_lr"] = 1.0
        base["mini_batch_size"] = overrides.get("mini_batch_size", 16 if name == "cogvideox-5b" else base["mini_batch_size"])
    base.update(overrides)
    return TTTDiTConfig(**base)


PRESETS: dict[str, dict[str, Any]] = {
    # CogVideoX-5B (THUDM/CogVideoX-5b transformer/config.json) + TTT-MLP as in the paper.
    "cogvideox-5b": dict(
        num_attention_heads=48,
        attention_head_dim=64,
        in_channels=16,
        out_channels=16,
        time_embed_dim=512,
        text_embed_dim=4096,
        num_layers=42,
        sample_width=90,
        sample_height=60,
        sample_frames=49,
        patch_size=2,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=True,
        global_layer="ttt_mlp",
        mini_batch_size=64,
        ttt_base_lr=0.1,
    ),
    # Tiny: 2 heads x 16, 2 layers, 8x12 latent (64x96 pixels), 4 latent channels, 16 text tokens of
    # width 32 per segment. 24 tokens per latent frame; a 3-s segment is 13 x 24 + 16 = 328 tokens.
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=12,
        sample_height=8,
        sample_frames=49,
        patch_size=2,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
        global_layer="ttt_mlp",
        mini_batch_size=16,
        ttt_base_lr=0.1,
        scan_checkpoint_group_size=4,
    ),
}

# Toyworld: the embedded default (docs/toyworld.md), the tiny preset with these changes. Head dim 64 so the
# device-verified Triton builds run it in training; 6 layers x width 128 samples a one-minute video (50 steps,
# CFG) in 100-160 s on a 2-core CPU. 8 latent channels (the toy VAE's); 72 text tokens (toy paragraphs are <= 47
# tokens) make a 3-s segment 13 x 24 + 72 = 384 tokens = 6 TTT mini-batches of 64, so no padding.
PRESETS["toyworld"] = {
    **PRESETS["tiny"],
    "attention_head_dim": 64,
    "in_channels": 8,
    "out_channels": 8,
    "time_embed_dim": 128,
    "num_layers": 6,
    "max_text_seq_length": 72,
    "mini_batch_size": 64,
}
