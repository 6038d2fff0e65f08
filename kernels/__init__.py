"""Triton TTT-MLP / TTT-Linear kernels implementing the contract of ttt_core.ops (see kernels/ttt_triton.py)."""

from .ttt_triton import triton_supports, ttt_linear_triton, ttt_mlp_triton

__all__ = ["ttt_mlp_triton", "ttt_linear_triton", "triton_supports"]
