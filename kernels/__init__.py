"""Attention kernels (Triton) and the PyTorch references they must match.

Installed as `freelunch.kernels`: never a top-level `kernels` package, which transformers
would take for the PyPI `kernels` hub package.
"""
