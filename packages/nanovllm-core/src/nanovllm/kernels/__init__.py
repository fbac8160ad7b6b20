"""Triton kernels shared by the CUDA attention backends; imported only by them (triton is Linux-only)."""
