"""The TTT layer of the TTT-DiT (TTT-MLP or TTT-Linear), faithful to the paper and ttt-video-dit
(``ttt/models/ssm/ttt_layer.py``); the inner loop itself is ``ops.ttt_mlp`` / ``ops.ttt_linear``.

One call of ``TTTLayer`` maps a whole video's tokens (every segment's text + all video tokens) to the
layer output, in either direction:

1. q, k, v = wq(x), wk(x), wv(x) per head (width -> width, with bias); q and k L2-normalised per head.
2. 3D RoPE (theta 10000) on the *video* tokens' q and k, positions over the whole video's latent frames
   (t, y, x) assigned by video-sequence index, as the official ``apply_rotary_emb(freqs_cis[:seq_len])``
   does. In the reversed pass the video tokens are flipped first and the positions are still taken by
   sequence index, so reversed token j gets the position of forward token j (a mirror of the video in
   t, y and x). We match that: it is how their checkpoints were trained.
3. Reconstruction target V := K + LN_h(V - K) with the per-head ``ttt_norm_weight / bias``; like the
   official ``ln_reconstruction_target`` this LN divides by the *unbiased* std with eps 1e-8 added to the
   std (not to the variance), unlike the biased-variance LN of the inner loss in ``ops``.
4. Per-token inner learning rate eta_j = base_lr * sigmoid(x_j . w_h + b_h) / head_dim / mini_batch_size,
   computed from the layer's input hidden states (no position-dependent token_eta: "not used for
   non-causal chunks").
5. Interleave: segment by segment, the segment's text tokens followed by the video tokens it owns
   (``VideoGeometry.owned_frames``: 13 latent frames for the first segment, 12 after). The reversed pass
   reverses the text in segment order only (tokens inside a segment keep their order), flips the video
   tokens as a whole, and then interleaves exactly like the forward pass (so its first chunk takes 13
   flipped frames: the shared frame moves by one segment, as in the official code, whose interleave
   offsets do not depend on the direction).
6. Pad to a multiple of the mini-batch with tokens whose eta is 0, placed after every real token, so
   they add nothing to any inner gradient and real outputs do not depend on them (the official code
   instead chose text lengths that make the total a multiple of 64).
7. The inner loop (``ops``), un-interleave, post LayerNorm(width, eps 1e-6), then wo.

Where we differ from the official code, and why:
- eta is interleaved together with its tokens. The official code interleaves its [.., K, K] eta matrix
  along the *row* (query) axis only, so in multi-segment sequences token j's column learning rate comes
  from a different token (a layout bug; the per-token contract of ``ops`` cannot express it). The
  difference is small (all etas are ~base_lr * sigmoid(.) / D / K) but exists for S > 1.
- Projection biases start at zero; the official code draws weights N(0, 0.02) and leaves the biases at
  nn.Linear's default uniform init.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TTTDiTConfig
from .geometry import VideoGeometry
from .ops import ttt_linear, ttt_mlp

TARGET_LN_EPS = 1e-8  # added to the (unbiased) std, as the official ln_reconstruction_target
POST_NORM_EPS = 1e-6
INIT_STD = 0.02

__all__ = ["TTTLayer", "ttt_rope_angles", "apply_pairwise_rope", "sequence_order"]


# --------------------------------------------------------------------------------------------------
# 3D RoPE of the TTT layer (the official precompute_freqs_cis_3d / apply_rotary_emb, in real arithmetic)
# --------------------------------------------------------------------------------------------------
def ttt_rope_angles(head_dim: int, frames: int, height: int, width: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles [frames * height * width, head_dim // 2] (float64) for tokens in (t, y, x) order.

    Channel pairs (2i, 2i + 1) are rotated by angle i; the first head_dim / 8 pairs follow t, the next
    3 head_dim / 16 follow y, the last 3 head_dim / 16 follow x (dims D/4, 3D/8, 3D/8 as the official).
    """
    dim_t, dim_h, dim_w = head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3
    if dim_t // 2 + dim_h // 2 + dim_w // 2 != head_dim // 2 or head_dim % 2:
        raise ValueError(f"3D RoPE needs a head_dim whose t/h/w split covers it (a multiple of 16), got {head_dim}")

    def freqs(dim: int) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))

    t = torch.arange(frames, dtype=torch.float64)[:, None] * freqs(dim_t)  # [T, dim_t/2]
    y = torch.arange(height, dtype=torch.float64)[:, None] * freqs(dim_h)
    x = torch.arange(width, dtype=torch.float64)[:, None] * freqs(dim_w)
    angles = torch.cat(
        [
            t[:, None, None, :].expand(frames, height, width, -1),
            y[None, :, None, :].expand(frames, height, width, -1),
            x[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return angles.reshape(frames * height * width, head_dim // 2)


def apply_pairwise_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [..., N, D] by angles given as cos/sin [N, D/2].

    Same as the official complex multiplication view_as_complex(x.reshape(..., D/2, 2)) * e^{i angle}.
    Computed in float32 at least (the official casts to float32), returned in x's dtype.
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    xr = x.to(cdt).unflatten(-1, (-1, 2))
    even, odd = xr[..., 0], xr[..., 1]
    cos, sin = cos.to(cdt), sin.to(cdt)
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# interleaving
# --------------------------------------------------------------------------------------------------
def sequence_order(geometry: VideoGeometry, reverse: bool = False) -> torch.Tensor:
    """Indices into the natural token layout [all text (segment-major), all video] in TTT-scan order.

    Forward: text of segment i, then the video tokens of ``geometry.owned_frames(i)``, for i = 0..S-1.
    Reverse: the sequence with text reversed in segment order and video flipped as a whole, interleaved
    the same way (chunk c = text of segment S-1-c + flipped video tokens of ``owned_frames(c)``).
    """
    S, L = geometry.num_segments, geometry.text_tokens_per_segment
    T, n_video = geometry.tokens_per_latent_frame, geometry.video_tokens
    text_base = S * L
    parts = []
    for chunk in range(S):
        seg = S - 1 - chunk if reverse else chunk
        parts.append(torch.arange(seg * L, (seg + 1) * L))
        lo, hi = geometry.owned_frames(chunk)
        video_idx = torch.arange(lo * T, hi * T)  # indices into the (possibly flipped) video sequence
        if reverse:
            video_idx = n_video - 1 - video_idx
        parts.append(text_base + video_idx)
    return torch.cat(parts)


@functools.lru_cache(maxsize=8)
def _scan_orders(geometry: VideoGeometry, reverse: bool, device: torch.device):
    """(order, inverse order) on ``device``; shared by all layers (one copy per video shape)."""
    order = sequence_order(geometry, reverse)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(device), inverse.to(device)


@functools.lru_cache(maxsize=8)
def _rope_tables(head_dim: int, grid: tuple, theta: float, reverse: bool, device: torch.device, dtype):
    """cos / sin [F*h*w, head_dim/2] of the video tokens by sequence index, shared by all layers (at 63 s
    one table is ~44 MB in float32). ``reverse``: the table of the flipped video (position by index)."""
    angles = ttt_rope_angles(head_dim, *grid, theta)
    if reverse:
        angles = angles.flip(0)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


# --------------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------------
class TTTLayer(nn.Module):
    """TTT-MLP / TTT-Linear layer (per ``config.global_layer``) over a whole multi-segment video.

    Parameters (names as in docs/architecture.md and the official checkpoints): wq, wk, wv, wo,
    post_norm, ttt_norm_weight [H, D], ttt_norm_bias [H, D], learnable_ttt_lr_weight [H, 1, width],
    learnable_ttt_lr_bias [H, 1], W1, b1 (, W2, b2).
    """

    def __init__(self, config: TTTDiTConfig):
        super().__init__()
        if config.global_layer not in ("ttt_mlp", "ttt_linear"):
            raise ValueError(f"TTTLayer needs global_layer 'ttt_mlp' or 'ttt_linear', got {config.global_layer!r}")
        self.kind = config.global_layer
        self.num_heads = H = config.num_attention_heads
        self.head_dim = D = config.attention_head_dim
        self.width = W = config.width
        self.patch_size = config.patch_size
        self.mini_batch_size = config.mini_batch_size
        self.base_lr = config.ttt_base_lr
        self.rope_theta = config.rope_theta
        self.backend = config.ttt_backend
        ttt_rope_angles(D, 1, 1, 1)  # validate head_dim early

        self.wq = nn.Linear(W, W, bias=True)
        self.wk = nn.Linear(W, W, bias=True)
        self.wv = nn.Linear(W, W, bias=True)
        self.wo = nn.Linear(W, W, bias=True)
        self.post_norm = nn.LayerNorm(W, eps=POST_NORM_EPS)
        self.ttt_norm_weight = nn.Parameter(torch.empty(H, D))
        self.ttt_norm_bias = nn.Parameter(torch.empty(H, D))
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(H, 1, W))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.empty(H, 1))
        if self.kind == "ttt_mlp":
            hidden = config.mlp_expansion * D
            self.W1 = nn.Parameter(torch.empty(H, D, hidden))
            self.b1 = nn.Parameter(torch.empty(H, 1, hidden))
            self.W2 = nn.Parameter(torch.empty(H, hidden, D))
            self.b2 = nn.Parameter(torch.empty(H, 1, D))
        else:
            self.W1 = nn.Parameter(torch.empty(H, D, D))
            self.b1 = nn.Parameter(torch.empty(H, 1, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the official init_weights (also usable after building on the meta device)."""
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, mean=0.0, std=INIT_STD)
            nn.init.zeros_(lin.bias)
        self.post_norm.reset_parameters()
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        nn.init.normal_(self.learnable_ttt_lr_weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.learnable_ttt_lr_bias)
        for name in self.state_names:
            p = getattr(self, name)
            if name.startswith("W"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD)
            else:
                nn.init.zeros_(p)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("W1", "b1", "W2", "b2") if self.kind == "ttt_mlp" else ("W1", "b1")

    # ---- pieces ---------------------------------------------------------------------------------
    def reconstruction_target(self, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """V := K + LN_h(V - K) over the head dim of [B, N, H, D] (unbiased std, eps added to the std)."""
        d = v - k
        centered = d - d.mean(dim=-1, keepdim=True)
        # unbiased std, as torch.std in the official code; through vector_norm because torch.std over rows of
        # 64 is ~10x slower on CPUs (7 ms a call at the one-minute shape, 12 calls per DiT forward)
        std = torch.linalg.vector_norm(centered, dim=-1, keepdim=True) / math.sqrt(d.shape[-1] - 1)
        return k + centered / (std + TARGET_LN_EPS) * self.ttt_norm_weight + self.ttt_norm_bias

    def inner_lr(self, x: torch.Tensor) -> torch.Tensor:
        """Final per-token inner learning rate eta [B, H, N] from hidden states x [B, N, width]."""
        logits = torch.einsum("bnc,hc->bhn", x, self.learnable_ttt_lr_weight[:, 0, :].to(x.dtype))
        logits = logits + self.learnable_ttt_lr_bias.to(x.dtype).view(1, self.num_heads, 1)
        return self.base_lr * torch.sigmoid(logits) / self.head_dim / self.mini_batch_size

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        grid: tuple[int, int, int],
        reverse: bool = False,
        checkpoint_group_size: int = 0,
        *,
        _extra_pad_mini_batches: int = 0,
        _pad_generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layer over a whole video.

        text [B, S, L, width] (segment-major), video [B, F * h * w, width] in (t, y, x) order, grid =
        (F, h, w) in patches. ``reverse`` runs the backward direction (see module docstring); outputs are
        always returned in the natural (forward) layout: (text_out [B, S, L, width], video_out).
        ``_extra_pad_mini_batches`` / ``_pad_generator`` exist for the padding-invariance test only (more
        pad tokens / random pad contents).
        """
        B, S, L, W = text.shape
        frames, gh, gw = grid
        if video.shape != (B, frames * gh * gw, W):
            raise ValueError(
                f"TTTLayer: video tokens have shape {tuple(video.shape)}, expected {(B, frames * gh * gw, W)} "
                f"for a {frames}x{gh}x{gw} patch grid"
            )
        geometry = VideoGeometry(
            num_segments=S,
            latent_height=gh * self.patch_size,
            latent_width=gw * self.patch_size,
            patch_size=self.patch_size,
            text_tokens_per_segment=L,
        )
        if geometry.latent_frames != frames:
            raise ValueError(
                f"TTTLayer: {S} segment(s) need {geometry.latent_frames} latent frames, got {frames}"
            )
        H, D = self.num_heads, self.head_dim
        n_text = S * L
        x = torch.cat([text.reshape(B, n_text, W), video], dim=1)  # natural layout
        N = x.shape[1]

        q = F.normalize(self.wq(x).view(B, N, H, D), p=2, dim=-1)
        k = F.normalize(self.wk(x).view(B, N, H, D), p=2, dim=-1)
        v = self.wv(x).view(B, N, H, D)

        cdt = torch.promote_types(x.dtype, torch.float32)
        cos, sin = _rope_tables(self.head_dim, (frames, gh, gw), self.rope_theta, reverse, x.device, cdt)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads of [B, Nv, H, D]
        q = torch.cat([q[:, :n_text], apply_pairwise_rope(q[:, n_text:], cos, sin)], dim=1)
        k = torch.cat([k[:, :n_text], apply_pairwise_rope(k[:, n_text:], cos, sin)], dim=1)
        v = self.reconstruction_target(v, k)
        eta = self.inner_lr(x)  # [B, H, N]

        order, inverse = _scan_orders(geometry, reverse, x.device)
        q, k, v = (t.transpose(1, 2)[:, :, order] for t in (q, k, v))  # [B, H, N, D], scan order
        eta = eta[:, :, order]

        n_pad = (-N) % self.mini_batch_size + _extra_pad_mini_batches * self.mini_batch_size
        if n_pad:
            if _pad_generator is not None:
                pad = torch.randn(3, B, H, n_pad, D, generator=_pad_generator, dtype=q.dtype).to(q.device)
            else:
                pad = q.new_zeros(3, B, H, n_pad, D)
            q, k, v = (torch.cat([t, p], dim=2) for t, p in zip((q, k, v), pad))
            eta = torch.cat([eta, eta.new_zeros(B, H, n_pad)], dim=2)  # pad tokens take no inner step

        # initial state tiled over the batch (a copy, like the official torch.tile; kernels want contiguous)
        state = tuple(getattr(self, n).unsqueeze(0).expand(B, *getattr(self, n).shape).contiguous() for n in self.state_names)
        op = ttt_mlp if self.kind == "ttt_mlp" else ttt_linear
        out, _ = op(
            q,
            k,
            v,
            eta,
            state,
            self.ttt_norm_weight,
            self.ttt_norm_bias,
            mini_batch_size=self.mini_batch_size,
            checkpoint_group_size=checkpoint_group_size,
            backend=self.backend,
        )
        out = out[:, :, :N][:, :, inverse].transpose(1, 2).reshape(B, N, W)  # natural layout
        out = self.wo(self.post_norm(out))
        return out[:, :n_text].reshape(B, S, L, W), out[:, n_text:]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.num_heads}, head_dim={self.head_dim}, mini_batch={self.mini_batch_size}"
