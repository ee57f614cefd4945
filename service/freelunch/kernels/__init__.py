"""Kernels: Triton attention kernels and the PyTorch references they must match, and the C
kernels that CPU runs use (cpu_kernels.c: few-row linear, paged attention for few queries).

Installed as `freelunch.kernels`: never a top-level `kernels` package, which transformers
would take for the PyPI `kernels` hub package.
"""
