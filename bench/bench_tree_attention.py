"""Triton tree attention vs the PyTorch reference, for verifying the 2.2.2 draft tree (81 queries).

    python bench/bench_tree_attention.py [--lengths 256,1024,4096] [--heads 32 --kv-heads 8 --dim 128]

L is the number of keys per sequence: a committed prefix of L - 81 tokens, visible to every
node, then the tree's own 81 keys under the ancestor mask, all gathered from a flat paged
cache. Times are medians from triton.testing.do_bench. Needs CUDA: on CPU it says so and exits 0.
Writes JSON (default bench/results/tree_attention.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_inputs(
    batch: int, heads: int, kv_heads: int, dim: int, length: int, dtype: torch.dtype, tree_mask: torch.Tensor
) -> dict:
    """Random q / cache, slots gathered out of order, prefix + ancestor mask [B, n, L]."""
    n = tree_mask.shape[0]
    slots = batch * length + 1024
    q = torch.randn(batch, n, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)  # [B, H, n, D] view
    k_cache = torch.randn(slots, kv_heads, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn(slots, kv_heads, dim, device="cuda", dtype=dtype)
    kv_index = torch.randperm(slots, device="cuda")[: batch * length].view(batch, length)
    prefix = torch.ones(n, length - n, dtype=torch.bool)
    mask = torch.cat([prefix, tree_mask], dim=1).expand(batch, n, length).to("cuda")
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, kv_index=kv_index, mask=mask, scale=dim**-0.5)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", default="256,1024,4096", help="keys per sequence (prefix + 81 tree nodes)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--out", default="bench/results/tree_attention.json")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_tree_attention: needs a CUDA GPU (Triton kernels are compiled for GPUs); skipped.")
        return None

    import triton
    import triton.testing

    from freelunch.kernels.paged_attention_ref import paged_attention_ref
    from freelunch.kernels.tree_attention_triton import tree_attention
    from freelunch.methods.tree_templates import TEMPLATE_222, DraftTree

    tree = DraftTree.from_template(TEMPLATE_222)
    dtype = DTYPES[args.dtype]
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        if length < tree.size:
            raise SystemExit(f"--lengths: {length} < {tree.size} tree nodes")
        x = make_inputs(args.batch, args.heads, args.kv_heads, args.dim, length, dtype, tree.ancestor_mask)
        err = (tree_attention(**x).float() - paged_attention_ref(**x).float()).abs().max().item()
        t_triton = triton.testing.do_bench(lambda: tree_attention(**x), return_mode="median")  # ms
        t_ref = triton.testing.do_bench(lambda: paged_attention_ref(**x), return_mode="median")
        rows.append(
            {
                "L": length,
                "triton_us": t_triton * 1e3,
                "reference_us": t_ref * 1e3,
                "speedup": t_ref / t_triton,
                "max_abs_err": err,
            }
        )

    print(
        f"tree 2.2.2 ({tree.size} queries), B={args.batch}, H/Hkv={args.heads}/{args.kv_heads}, "
        f"D={args.dim}, {args.dtype}, {torch.cuda.get_device_name()}"
    )
    print(f"{'L':>6} {'triton us':>10} {'ref us':>10} {'speedup':>8} {'max err':>9}")
    for r in rows:
        print(
            f"{r['L']:>6} {r['triton_us']:>10.1f} {r['reference_us']:>10.1f} "
            f"{r['speedup']:>7.2f}x {r['max_abs_err']:>9.2e}"
        )

    results = {
        "shape": {
            "batch": args.batch,
            "queries": tree.size,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "dim": args.dim,
            "dtype": args.dtype,
        },
        "rows": rows,
        "machine": {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
