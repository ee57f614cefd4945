"""The Triton tree-attention kernel against `paged_attention_ref`.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); shapes stay small because the interpreter is slow. With CUDA, one more test runs
the compiled kernel in a fresh process (the interpreter choice is fixed at import).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: kernels become interpreted

import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from freelunch.kernels.paged_attention_ref import paged_attention_ref  # noqa: E402
from freelunch.kernels.tree_attention_triton import INTERPRETED, tree_attention  # noqa: E402
from freelunch.methods.tree_templates import TEMPLATE_222, DraftTree  # noqa: E402

TOLERANCE = {  # (atol, rtol) against the reference on the same inputs
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


class Case(NamedTuple):
    batch: int
    heads: int
    kv_heads: int
    n: int  # queries per sequence
    length: int  # L: gathered keys per sequence
    dim: int
    dtype: torch.dtype
    mask: str  # "random" | "none" | "tree" (prefix of L - n, then the 2.2.2 tree)
    block_n: int | None = None  # small tiles: several of them, with a partial last one
    scale: float | None = None
    index_dtype: torch.dtype = torch.long


CASES = [
    Case(1, 4, 2, 1, 1, 16, torch.float32, "random"),
    Case(2, 4, 2, 7, 50, 32, torch.float32, "random", block_n=16),
    Case(3, 8, 8, 7, 200, 64, torch.float32, "none", index_dtype=torch.int32),
    Case(2, 8, 8, 1, 130, 128, torch.float32, "random", block_n=32, scale=0.3),
    Case(2, 4, 2, 81, 200, 64, torch.float32, "tree"),
    Case(2, 4, 2, 7, 77, 64, torch.bfloat16, "random"),
    Case(3, 4, 2, 1, 150, 32, torch.bfloat16, "none"),
    Case(1, 8, 8, 81, 121, 32, torch.bfloat16, "tree", block_n=32),
    Case(1, 8, 8, 7, 33, 128, torch.float16, "random", block_n=32),
    Case(1, 2, 1, 128, 40, 16, torch.float32, "random"),  # n at its maximum
]


def tree_mask(batch: int, length: int) -> torch.Tensor:
    """[B, 81, L]: the committed prefix (L - 81 keys) is visible to every node, then ancestors."""
    ancestors = DraftTree.from_template(TEMPLATE_222).ancestor_mask  # [81, 81]
    n = ancestors.shape[0]
    full = torch.cat([torch.ones(n, length - n, dtype=torch.bool), ancestors], dim=1)
    return full.expand(batch, n, length)  # stride 0 over B, as a shared tree would be


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, n, length, d = case.batch, case.heads, case.kv_heads, case.n, case.length, case.dim
    slots = b * length + 13  # more slots than used, gathered out of order
    # q as the engine builds it: packed [B, n, H, D] viewed as [B, H, n, D] (not contiguous).
    q = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
    k_cache = torch.randn(slots, hkv, d, generator=g)
    v_cache = torch.randn(slots, hkv, d, generator=g)
    kv_index = torch.randperm(slots, generator=g)[: b * length].view(b, length).to(case.index_dtype)
    if case.mask == "none":
        mask = None
    elif case.mask == "tree":
        assert n == len(TEMPLATE_222) + 1
        mask = tree_mask(b, length)
    else:  # random, with at least one visible key per query
        mask = torch.rand(b, n, length, generator=g) < 0.3
        mask[torch.arange(b)[:, None], torch.arange(n), torch.randint(length, (b, n), generator=g)] = True
    inputs = dict(q=q, k_cache=k_cache, v_cache=v_cache, kv_index=kv_index, mask=mask)
    inputs = {
        key: None if t is None else t.to(device, case.dtype if t.is_floating_point() else t.dtype)
        for key, t in inputs.items()
    }
    return inputs | {"scale": case.scale}


def case_id(case: Case) -> str:
    dt = str(case.dtype).removeprefix("torch.")
    heads = f"H{case.heads}/{case.kv_heads}"
    return f"B{case.batch}-{heads}-n{case.n}-L{case.length}-D{case.dim}-{dt}-{case.mask}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case: Case) -> None:
    assert INTERPRETED
    inputs = make_inputs(case)
    out = tree_attention(**inputs, block_n=case.block_n)
    ref = paged_attention_ref(**inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    atol, rtol = TOLERANCE[case.dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_query_that_sees_nothing_gets_zeros() -> None:
    inputs = make_inputs(Case(1, 4, 2, 3, 20, 16, torch.float32, "random"))
    inputs["mask"][0, 1] = False
    out = tree_attention(**inputs)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    ref = paged_attention_ref(**inputs)
    torch.testing.assert_close(out[:, :, [0, 2]], ref[:, :, [0, 2]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: x | {"q": x["q"][..., :8]}, "k/v cache"),
        (lambda x: x | {"q": torch.randn(1, 4, 3, 48), "k_cache": torch.randn(20, 2, 48),
                        "v_cache": torch.randn(20, 2, 48)}, "head_dim"),
        (lambda x: x | {"q": torch.randn(1, 3, 3, 16)}, "multiple"),
        (lambda x: x | {"q": x["q"].double()}, "dtypes"),
        (lambda x: x | {"mask": x["mask"].int()}, "mask"),
        (lambda x: x | {"kv_index": x["kv_index"][:, None]}, "kv_index"),
        (lambda x: x | {"kv_index": x["kv_index"].float()}, "kv_index"),
    ],
)  # fmt: skip
def test_rejects_bad_arguments(change, message: str) -> None:
    inputs = change(make_inputs(Case(1, 4, 2, 3, 10, 16, torch.float32, "random")))
    with pytest.raises(ValueError, match=message):
        tree_attention(**inputs)


# The compiled kernel: a fresh interpreter-free process, the 2.2.2 tree at realistic lengths.
CUDA_SCRIPT = """
import os
import torch
from freelunch.kernels.tree_attention_triton import INTERPRETED, tree_attention  # compiled: imported first
import test_tree_attention_kernel as t  # for its cases; it sets TRITON_INTERPRET=1, undone here
os.environ.pop("TRITON_INTERPRET")
from freelunch.kernels.paged_attention_ref import paged_attention_ref
assert not INTERPRETED
cases = list(t.CASES) + [
    t.Case(2, 32, 8, 81, 4096, 128, torch.bfloat16, "tree"),
    t.Case(4, 16, 4, 81, 1111, 64, torch.float16, "tree"),
    t.Case(3, 12, 4, 128, 700, 64, torch.bfloat16, "random"),
    t.Case(2, 8, 2, 81, 300, 128, torch.float32, "tree"),
]
for case in cases:
    x = t.make_inputs(case, device="cuda")
    atol, rtol = t.TOLERANCE[case.dtype]
    out = tree_attention(**x, block_n=case.block_n)
    torch.testing.assert_close(out, paged_attention_ref(**x), atol=atol, rtol=rtol)
print("ok", len(cases))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_on_cuda() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", CUDA_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok")
