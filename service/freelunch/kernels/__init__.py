"""Kernels: Triton attention kernels and the PyTorch references they must match, and the C
kernels that CPU runs use (the top-level kernels/cpu/, built by cpu_kernels.py: linears with float or int8 activations,
paged attention for few queries, the elementwise steps, a whole decoder stack in one call).

Installed as `freelunch.kernels`: never a top-level `kernels` package, which transformers
would take for the PyPI `kernels` hub package.
"""
