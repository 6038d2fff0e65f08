"""Triton TTT-MLP / TTT-Linear kernels implementing the contract of ttt_core.ops."""
