"""TTT-DiT: diffusers' CogVideoX transformer with segment-local attention and bidirectional gated TTT.

Built from diffusers' own CogVideoX modules (patch embedding, time embedding, ``CogVideoXBlock``'s
norm1 / attn1 / norm2 / ff, norm_final, norm_out, proj_out) under the same module names as
``CogVideoXTransformer3DModel``, so a diffusers transformer state dict loads unchanged. What the paper
adds lives under ``transformer_blocks.{i}.ttt.*`` (``TTTLayer``) and
``transformer_blocks.{i}.ttt_gates.{forward_text, forward_video, backward_text, backward_video}``.

Block (paper Sec. 3 and ttt-video-dit ``ttt/models/cogvideo/dit.py``):
    X' = local_attn(adaLN(X))                   (segment-local windows, CogVideoX's own 13-frame RoPE)
    Z  = tanh(a) * TTT(X') + X'                 (forward direction; gates per channel, text / video)
    Z' = tanh(b) * TTT_reversed(Z) + Z          (same layer and parameters on the reversed sequence)
    X  = X + gate_msa * Z'                      (Z' takes the attention output's place in the adaLN
                                                 residual; the feed-forward half is CogVideoX's unchanged)

Segment-local attention: window i = the text of segment i + latent frames ``geometry.window(i)``
([12 i, 12 i + 13)); all windows run as one batch (stacked on the batch dim). A latent frame shared by
two windows gets the average of both outputs; each segment's text output comes from its own window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers.models.embeddings import (
    CogVideoXPatchEmbed,
    TimestepEmbedding,
    Timesteps,
    get_3d_rotary_pos_embed,
)
from diffusers.models.normalization import AdaLayerNorm
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import TTTDiTConfig
from .geometry import FIRST_SEGMENT_LATENT_FRAMES, VideoGeometry, segments_for_latent_frames
from .ops import BACKENDS
from .ttt_layer import TTTLayer

__all__ = ["TTTDiT", "TTTDiTBlock", "TTTGates", "window_rotary_embedding"]

GATE_NAMES = ("forward_text", "forward_video", "backward_text", "backward_video")


def _resize_crop_region_for_grid(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """Same as diffusers' CogVideoX pipeline ``get_resize_crop_region_for_grid`` (not imported: the
    pipeline module pulls in transformers' T5)."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, int(round(tgt_height / h * w))
    else:
        resize_width, resize_height = tgt_width, int(round(tgt_width / w * h))
    top, left = int(round((tgt_height - resize_height) / 2.0)), int(round((tgt_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def window_rotary_embedding(config: TTTDiTConfig, grid_height: int, grid_width: int, device=None):
    """The (cos, sin) RoPE of one 13-latent-frame window, exactly as diffusers' CogVideoX pipeline
    builds ``image_rotary_emb`` for a 13-frame video (``_prepare_rotary_positional_embeddings``)."""
    crops = _resize_crop_region_for_grid(
        (grid_height, grid_width), config.sample_width // config.patch_size, config.sample_height // config.patch_size
    )
    return get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim,
        crops_coords=crops,
        grid_size=(grid_height, grid_width),
        temporal_size=FIRST_SEGMENT_LATENT_FRAMES,
        device=device,
    )


class TTTGates(nn.Module):
    """Four per-channel gates (init ``gate_init``); ``gates(name, x) = tanh(alpha_name) * x``."""

    def __init__(self, width: int, init: float):
        super().__init__()
        self.init = init
        for name in GATE_NAMES:
            setattr(self, name, nn.Parameter(torch.full((width,), float(init))))

    def reset_parameters(self) -> None:
        for name in GATE_NAMES:
            nn.init.constant_(getattr(self, name), self.init)

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(getattr(self, name)).to(x.dtype) * x


@dataclass
class _Layout:
    """Per-forward token layout shared by all blocks (built once in ``TTTDiT.forward``)."""

    num_segments: int
    text_len: int  # tokens per segment
    grid: tuple[int, int, int]  # (latent frames, patch rows, patch cols)
    window_frames: torch.Tensor  # [S, 13] latent-frame indices of each window
    frame_counts: torch.Tensor  # [F] how many windows see each frame (1 or 2)
    rotary: tuple[torch.Tensor, torch.Tensor]  # CogVideoX window RoPE (cos, sin)
    scan_checkpoint_group: int


class TTTDiTBlock(CogVideoXBlock):
    """``CogVideoXBlock`` (same submodules and names) whose attention half is segment-local attention
    followed by bidirectional gated TTT (``ttt`` / ``ttt_gates``; absent for global_layer 'none')."""

    def __init__(self, config: TTTDiTConfig):
        super().__init__(
            dim=config.width,
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            time_embed_dim=config.time_embed_dim,
            dropout=config.dropout,
            activation_fn=config.activation_fn,
            attention_bias=config.attention_bias,
            norm_elementwise_affine=config.norm_elementwise_affine,
            norm_eps=config.norm_eps,
        )
        self.gradient_checkpointing = False
        if config.global_layer == "none":
            self.ttt = None
            self.ttt_gates = None
        else:
            self.ttt = TTTLayer(config)
            self.ttt_gates = TTTGates(config.width, config.gate_init)

    def local_attention(self, video: torch.Tensor, text: torch.Tensor, layout: _Layout):
        """Segment-local attention. video [B, F*T, W], text [B, S*L, W] -> same shapes."""
        B, _, W = video.shape
        S, L = layout.num_segments, layout.text_len
        frames, gh, gw = layout.grid
        T = gh * gw
        if S == 1:  # the single window is the whole sequence
            return self.attn1(hidden_states=video, encoder_hidden_states=text, image_rotary_emb=layout.rotary)
        win_len = layout.window_frames.shape[1]
        windows = video.reshape(B, frames, T, W)[:, layout.window_frames]  # [B, S, 13, T, W]
        out_video, out_text = self.attn1(
            hidden_states=windows.reshape(B * S, win_len * T, W),
            encoder_hidden_states=text.reshape(B * S, L, W),
            image_rotary_emb=layout.rotary,
        )
        summed = out_video.new_zeros(B, frames, T, W).index_add(
            1, layout.window_frames.flatten(), out_video.reshape(B, S * win_len, T, W)
        )
        averaged = summed / layout.frame_counts.to(summed.dtype).view(1, frames, 1, 1)
        return averaged.reshape(B, frames * T, W), out_text.reshape(B, S * L, W)

    def bidirectional_ttt(self, video: torch.Tensor, text: torch.Tensor, layout: _Layout):
        """Z = tanh(a) TTT(X') + X'; Z' = tanh(b) TTT_reversed(Z) + Z (text / video gates separate)."""
        B, _, W = video.shape
        S, L = layout.num_segments, layout.text_len
        text4 = text.reshape(B, S, L, W)
        for reverse, prefix in ((False, "forward"), (True, "backward")):
            t_out, v_out = self.ttt(text4, video, layout.grid, reverse=reverse,
                                    checkpoint_group_size=layout.scan_checkpoint_group)
            text4 = text4 + self.ttt_gates(f"{prefix}_text", t_out)
            video = video + self.ttt_gates(f"{prefix}_video", v_out)
        return video, text4.reshape(B, S * L, W)

    def forward(self, hidden_states, encoder_hidden_states, temb, layout: _Layout):  # type: ignore[override]
        # Checkpoint inside the block's forward (not around the call): FSDP2 casts a block's inputs to the
        # compute dtype in its forward hook but not when checkpointing recomputes, so the recomputation
        # must start from the already-cast inputs for the saved tensors to match.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, hidden_states, encoder_hidden_states, temb, layout, use_reentrant=False)
        return self._forward(hidden_states, encoder_hidden_states, temb, layout)

    def _forward(self, hidden_states, encoder_hidden_states, temb, layout: _Layout):
        video, text = hidden_states, encoder_hidden_states
        norm_video, norm_text, gate_msa, enc_gate_msa = self.norm1(video, text, temb)
        seq_video, seq_text = self.local_attention(norm_video, norm_text, layout)
        if self.ttt is not None:
            seq_video, seq_text = self.bidirectional_ttt(seq_video, seq_text, layout)
        video = video + gate_msa * seq_video
        text = text + enc_gate_msa * seq_text

        # feed-forward half: unchanged CogVideoX
        norm_video, norm_text, gate_ff, enc_gate_ff = self.norm2(video, text, temb)
        ff_output = self.ff(torch.cat([norm_text, norm_video], dim=1))
        n_text = text.shape[1]
        video = video + gate_ff * ff_output[:, n_text:]
        text = text + enc_gate_ff * ff_output[:, :n_text]
        return video, text


class TTTDiT(nn.Module):
    """CogVideoX transformer + segment-local attention + bidirectional gated TTT (see module docstring).

    ``forward(hidden_states [B, F_lat, C, h, w], encoder_hidden_states [B, S, L, text_dim], timestep [B])
    -> [B, F_lat, C_out, h, w]`` (v-prediction) for S >= 1 segments with F_lat = 13 + 12 (S - 1).
    """

    def __init__(self, config: TTTDiTConfig):
        super().__init__()
        if not config.use_rotary_positional_embeddings or config.use_learned_positional_embeddings:
            raise ValueError(
                "TTTDiT needs a CogVideoX with rotary position embeddings and no learned/sinusoidal ones "
                "(CogVideoX-5B); segment-local windows get CogVideoX's 13-frame RoPE each"
            )
        self.config = config
        inner = config.width
        self.patch_embed = CogVideoXPatchEmbed(
            patch_size=config.patch_size,
            patch_size_t=None,
            in_channels=config.in_channels,
            embed_dim=inner,
            text_embed_dim=config.text_embed_dim,
            bias=config.patch_bias,
            sample_width=config.sample_width,
            sample_height=config.sample_height,
            sample_frames=config.sample_frames,
            temporal_compression_ratio=config.temporal_compression_ratio,
            max_text_seq_length=config.max_text_seq_length,
            spatial_interpolation_scale=config.spatial_interpolation_scale,
            temporal_interpolation_scale=config.temporal_interpolation_scale,
            use_positional_embeddings=False,
            use_learned_positional_embeddings=False,
        )
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.time_proj = Timesteps(inner, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(inner, config.time_embed_dim, config.timestep_activation_fn)
        self.transformer_blocks = nn.ModuleList([TTTDiTBlock(config) for _ in range(config.num_layers)])
        self.norm_final = nn.LayerNorm(inner, config.norm_eps, config.norm_elementwise_affine)
        self.norm_out = AdaLayerNorm(
            embedding_dim=config.time_embed_dim,
            output_dim=2 * inner,
            norm_elementwise_affine=config.norm_elementwise_affine,
            norm_eps=config.norm_eps,
            chunk_dim=1,
        )
        self.proj_out = nn.Linear(inner, config.patch_size * config.patch_size * config.out_channels)
        self._rotary_cache: dict = {}

    # ---- construction / loading helpers --------------------------------------------------------
    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "TTTDiT":
        """See ``ttt_core.loading.load_ttt_dit`` (diffusers folder, single file, official keys)."""
        from .loading import load_ttt_dit

        return load_ttt_dit(*args, **kwargs)

    def ttt_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the paper adds (TTT layers and gates), for the trainer."""
        for name, param in self.named_parameters():
            if ".ttt." in name or ".ttt_gates." in name:
                yield name, param

    def reset_ttt_parameters(self) -> None:
        """Re-initialise the TTT additions (after a meta-device build + to_empty)."""
        for block in self.transformer_blocks:
            if block.ttt is not None:
                block.ttt.reset_parameters()
                block.ttt_gates.reset_parameters()

    def set_ttt_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"TTT backend must be one of {BACKENDS}, got {name!r}")
        self.config.ttt_backend = name
        for block in self.transformer_blocks:
            if block.ttt is not None:
                block.ttt.backend = name

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (set ``block.gradient_checkpointing`` per block to
        choose individual blocks)."""
        for block in self.transformer_blocks:
            block.gradient_checkpointing = enabled

    @property
    def gradient_checkpointing(self) -> bool:
        return any(block.gradient_checkpointing for block in self.transformer_blocks)

    # ---- forward ---------------------------------------------------------------------------------
    def _window_rotary(self, gh: int, gw: int, device, dtype):
        key = (gh, gw, str(device))
        if key not in self._rotary_cache:
            self._rotary_cache[key] = window_rotary_embedding(self.config, gh, gw, device=device)
        return self._rotary_cache[key]

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep):
        cfg = self.config
        if hidden_states.dim() != 5:
            raise ValueError(f"hidden_states must be [B, F_lat, C, h, w], got shape {tuple(hidden_states.shape)}")
        B, frames, C, h, w = hidden_states.shape
        if C != cfg.in_channels:
            raise ValueError(f"hidden_states has {C} latent channels, the model expects {cfg.in_channels}")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {cfg.patch_size}")
        if encoder_hidden_states.dim() != 4:
            raise ValueError(
                "encoder_hidden_states must be [B, S, L, text_dim] (per-segment text embeddings), got shape "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        Bt, S, L, text_dim = encoder_hidden_states.shape
        if Bt != B:
            raise ValueError(f"batch sizes differ: hidden_states {B}, encoder_hidden_states {Bt}")
        if text_dim != cfg.text_embed_dim:
            raise ValueError(f"text embeddings have width {text_dim}, the model expects {cfg.text_embed_dim}")
        expected = VideoGeometry(S, h, w, cfg.patch_size, L).latent_frames if S >= 1 else None
        if S < 1 or frames != expected:
            try:
                implied = f"; {frames} latent frames would be {segments_for_latent_frames(frames)} segment(s)"
            except ValueError as err:
                implied = f"; {err}"
            raise ValueError(
                f"{S} text segment(s) need 13 + 12 * (S - 1) = {expected} latent frames, got {frames}{implied}"
            )
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be a scalar or [B={B}], got shape {tuple(timestep.shape)}")
        return timestep

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        timestep = self._check_inputs(hidden_states, encoder_hidden_states, timestep)
        cfg = self.config
        B, frames, C, h, w = hidden_states.shape
        _, S, L, text_dim = encoder_hidden_states.shape
        p = cfg.patch_size
        gh, gw = h // p, w // p
        geometry = VideoGeometry(S, h, w, p, L)

        t_emb = self.time_proj(timestep).to(dtype=hidden_states.dtype)
        emb = self.time_embedding(t_emb)

        tokens = self.patch_embed(encoder_hidden_states.reshape(B, S * L, text_dim), hidden_states)
        tokens = self.embedding_dropout(tokens)
        text, video = tokens[:, : S * L], tokens[:, S * L :]

        device = hidden_states.device
        window_frames = torch.stack([torch.arange(*geometry.window(i)) for i in range(S)]).to(device)
        frame_counts = torch.bincount(window_frames.flatten(), minlength=frames)
        training_scan = self.training and torch.is_grad_enabled()
        layout = _Layout(
            num_segments=S,
            text_len=L,
            grid=(frames, gh, gw),
            window_frames=window_frames,
            frame_counts=frame_counts,
            # the blocks' compute dtype (the embedded tokens'), not the raw input's
            rotary=self._window_rotary(gh, gw, device, tokens.dtype),
            scan_checkpoint_group=cfg.scan_checkpoint_group_size if training_scan else 0,
        )

        for block in self.transformer_blocks:
            video, text = block(video, text, emb, layout)

        video = self.norm_final(video)
        video = self.norm_out(video, temb=emb)
        video = self.proj_out(video)
        # unpatchify as diffusers (CogVideoX 1.0, no temporal patch)
        out = video.reshape(B, frames, gh, gw, -1, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)

    # ---- bookkeeping -----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """{'cogvideox': ..., 'ttt': ..., 'total': ...} (works on the meta device)."""
        ttt_names = {name for name, _ in self.ttt_parameters()}
        ttt = sum(p.numel() for n, p in self.named_parameters() if n in ttt_names)
        total = sum(p.numel() for p in self.parameters())
        return {"cogvideox": total - ttt, "ttt": ttt, "total": total}
