"""Triton kernels (fastcog.kernels)."""
