"""Fused kernels for ASO-SE. Each op lives in its own file with its PyTorch reference beside it."""
