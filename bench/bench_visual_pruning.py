"""Visual token pruning (fastv, cls) at keep 1.0 / 0.5 / 0.25: prefill latency, total latency, KV bytes.

    python bench/bench_visual_pruning.py [--configs tiny,base336] [--max-tokens 16] [--repeats 2]

LLaVA-style models with random weights (cost only, no fidelity), built in code and saved as
llava-hf folders, run by our native engine in-process (float32, CPU, one request at a time):
- tiny: the seeded tiny LLaVA of tests/test_vlm.py (CLIP 4 layers, 49 image tokens, 3-layer Llama);
- base336: LLaVA-1.5's image geometry (336 px, patch 14 -> 576 image tokens, features of layer -2)
  with a CLIP ViT-B width tower (768 x 12 layers) and a SmolLM2-135M-shaped Llama (576 x 30 layers);
- large336: CLIP ViT-L/14-336 (LLaVA-1.5's own tower) with a SmolLM2-360M-shaped Llama (slow on CPU).

Per request: prefill latency (add_request to the first token, image encoding included), total
latency for --max-tokens output tokens (ignore_eos), and KV bytes:
- allocated: the peak bytes of KV blocks the request held (the engine's cache usage x its size);
- visible: what attention can read after the request, summed over layers. For cls it equals the
  tokens held (pruned features never become tokens). For fastv at the cache's split layer (FastV's
  default K = 2), layers >= K hold only the kept tokens in blocks of their own, so allocated
  shrinks too; only whole blocks count, and the lower pool (layers < K) holds every token.
Also an analytic language-model prefill FLOPs ratio (FastV paper's formula, per layer
4nd^2 + 2n^2d + 2ndm), for our configuration and for LLaVA-1.5-13B (the paper's ~45% at K=2, keep 0.5).

Timings are noisy when other processes share the CPU: load averages are recorded in the JSON.
Runs are interleaved (repeat -> method -> keep) so that drift hits every cell alike; the table shows
the minimum over repeats (least disturbed by other processes), the JSON has medians and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
IMAGE_TOKEN = "<image>"
METHODS = ("fastv", "cls")
KEEPS = (1.0, 0.5, 0.25)

# vision tower and text model shapes; text None = the tests' tiny Llama
CONFIGS = {
    "tiny": {
        "tower": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 4,
        },
        "text": None,
        "scale_weights": True,
    },
    "base336": {
        "tower": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 336,
            "patch_size": 14,
        },
        "text": {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
        },
        "scale_weights": False,
    },
    "large336": {
        "tower": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
        },
        "text": {
            "hidden_size": 960,
            "intermediate_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
        },
        "scale_weights": False,
    },
}


def build_llava(folder: Path, name: str, seed: int = 0) -> dict:
    """A random-weight LLaVA saved like a llava-hf checkpoint (config, safetensors, tokenizer, processor)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import default_tokenizer, tiny_llama_config
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    spec = CONFIGS[name]
    default_tokenizer().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tower = spec["tower"]
    side = tower["image_size"]
    patches = (side // tower["patch_size"]) ** 2
    if spec["text"] is None:
        text_config = tiny_llama_config("llama", vocab_size=len(tokenizer))
    else:
        text_config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            **spec["text"],
        )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**tower),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if spec["scale_weights"]:  # as tests/test_vlm.py: so that the image and the prune change the argmax
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.5 if "embed" in pname else 0.08)
                elif "bias" in pname:
                    p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=tower["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    params = {
        "vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in model.model.language_model.parameters())
        + (0 if config.text_config.tie_word_embeddings else model.lm_head.weight.numel()),
    }
    del model
    return params


def lm_prefill_flops(n: int, pruned: int, layers: int, d: int, m: int, k: int | None) -> float:
    """FastV paper's per-layer cost 4nd^2 + 2n^2d + 2ndm; layers >= k see n - pruned (k None: all layers)."""

    def layer(t: int) -> float:
        return 4 * t * d * d + 2 * t * t * d + 2 * t * d * m

    start = 0 if k is None else k
    return start * layer(n) + (layers - start) * layer(n - pruned)


def run_one(
    engine, ids: list[int], pixels: torch.Tensor, max_tokens: int, method: str, keep: float, tag: str
) -> dict:
    from freelunch.engine.request import GenerationRequest, ImageInput, SamplingParams

    blocks = engine.blocks
    cache_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in engine.kv.layers)
    usage_before = blocks.usage
    request = GenerationRequest(
        tag,
        list(ids),
        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        methods={"visual_pruning": {"method": method, "keep": keep}},
        images=[ImageInput.from_tensor(pixels)],
    )
    peak_usage, ttft, tokens, stats, prompt_tokens = usage_before, None, [], None, None
    start = time.perf_counter()
    engine.add_request(request)
    while engine.has_work():
        outs = engine.step()
        peak_usage = max(peak_usage, blocks.usage)
        for o in outs:
            if o.new_token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens.extend(o.new_token_ids)
            if o.finished:
                stats, prompt_tokens = o.method_stats, o.num_prompt_tokens
    total = time.perf_counter() - start
    engine.check_no_leaks()
    return {
        "prefill_s": ttft,
        "total_s": total,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "kv_allocated_bytes": round((peak_usage - usage_before) * cache_bytes),
        "stats": (stats or {}).get("visual_pruning", {}),
    }


def bench_config(name: str, max_tokens: int, repeats: int, workdir: Path) -> dict:
    from freelunch.config import EngineConfig
    from freelunch.pool.local_engine import install_plugins

    install_plugins()  # constraints and the installed methods, as a worker installs them
    from freelunch.engine.engine import Engine
    from freelunch.engine.kv_cache import KVCache
    from freelunch.models.loader import load_model, resolve_source

    folder = workdir / name
    folder.mkdir()
    t0 = time.perf_counter()
    params = build_llava(folder, name)
    loaded = load_model(resolve_source(str(folder)), "float32")
    loaded.model.tower_cache_size = 0  # every timed request runs the vision tower, as a new image would
    build_s = time.perf_counter() - t0
    cfg = loaded.model.config
    tok = loaded.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    spec = CONFIGS[name]
    side = spec["tower"]["image_size"]
    patches = (side // spec["tower"]["patch_size"]) ** 2
    head = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    tail = tok.encode(
        "\nDescribe this picture in detail.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    ids = head + [image_id] * patches + tail
    # CLIP-normalised random pixels: the processor's output shape, content irrelevant for cost
    pixels = torch.randn(3, side, side, generator=torch.Generator().manual_seed(1))
    engine = Engine(
        loaded,
        EngineConfig(model=str(folder), dtype="float32", max_num_batched_tokens=2048, kv_cache_gib=0.25),
    )
    per_token = KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, engine.kv.dtype)  # as stored
    per_token_layer = per_token // cfg.num_layers
    block_size = engine.blocks.block_size

    run_one(engine, ids, pixels, max_tokens, "cls", 1.0, f"{name}-warm")  # warm-up, not recorded
    # the fixed part no pruning removes: the vision tower (cls also needs its eager [CLS] attention)
    model = loaded.model
    vision_s = {"plain": [], "cls_attention": []}
    cls_from = min(
        round(spec["tower"]["num_hidden_layers"] * 2 / 3), model.cls_band_end - 1
    )  # the method default
    with torch.inference_mode():
        for _ in range(max(2, repeats)):
            t = time.perf_counter()
            model.project(model.encode_images(pixels[None])[0])
            vision_s["plain"].append(time.perf_counter() - t)
            t = time.perf_counter()
            features, _ = model.encode_images(pixels[None], cls_attention_from=cls_from)
            model.project(features)
            vision_s["cls_attention"].append(time.perf_counter() - t)
    runs: dict[tuple[str, float], list[dict]] = {(m, k): [] for m in METHODS for k in KEEPS}
    for r in range(repeats):
        for m in METHODS:
            for k in KEEPS:
                runs[(m, k)].append(run_one(engine, ids, pixels, max_tokens, m, k, f"{name}-{m}-{k}-{r}"))

    hidden = getattr(cfg, "hidden_size", None)
    inter = getattr(cfg, "intermediate_size", None)
    cells = []
    for m in METHODS:
        for k in KEEPS:
            rs = runs[(m, k)]
            last = rs[-1]
            image_tokens = last["stats"].get("image_tokens", patches)
            kept = last["stats"].get("kept_image_tokens", image_tokens)
            pruned = image_tokens - kept
            out_tokens = len(last["tokens"])
            held = (
                last["prompt_tokens"] + out_tokens - 1
            )  # tokens with K/V at the end (the last sampled one has none)
            if m == "cls":
                held_tokens = held  # prompt already shortened by the prune
                visible_layers = held * cfg.num_layers
            else:
                held_tokens = held
                k_layer = last["stats"].get("layer", 2)
                visible_layers = k_layer * held + (cfg.num_layers - k_layer) * (held - pruned)
            n_full = len(ids)
            flops = flops_full = None
            if hidden and inter:
                flops_full = lm_prefill_flops(n_full, 0, cfg.num_layers, hidden, inter, None)
                flops = lm_prefill_flops(
                    n_full,
                    pruned,
                    cfg.num_layers,
                    hidden,
                    inter,
                    last["stats"].get("layer", 2) if m == "fastv" else None,
                )
            cells.append(
                {
                    "method": m,
                    "keep": k,
                    "image_tokens": image_tokens,
                    "kept_image_tokens": kept,
                    "prompt_tokens_in_cache": last["prompt_tokens"],
                    "prefill_s": statistics.median(x["prefill_s"] for x in rs),
                    "total_s": statistics.median(x["total_s"] for x in rs),
                    "prefill_s_min": min(x["prefill_s"] for x in rs),
                    "total_s_min": min(x["total_s"] for x in rs),
                    "prefill_s_all": [x["prefill_s"] for x in rs],
                    "total_s_all": [x["total_s"] for x in rs],
                    "kv_tokens_held": held_tokens,
                    "kv_allocated_bytes": last["kv_allocated_bytes"],
                    "kv_held_bytes": held_tokens * per_token,
                    "kv_visible_bytes": visible_layers * per_token_layer,
                    "lm_prefill_flops_ratio": (flops / flops_full) if flops_full else None,
                    "output_tokens": out_tokens,
                    "same_tokens_as_keep1": last["tokens"] == runs[(m, 1.0)][-1]["tokens"],
                }
            )
    base = {m: next(c for c in cells if c["method"] == m and c["keep"] == 1.0) for m in METHODS}
    for c in cells:
        b = base[c["method"]]
        for key in (
            "prefill_s",
            "total_s",
            "prefill_s_min",
            "total_s_min",
            "kv_allocated_bytes",
            "kv_visible_bytes",
        ):
            c[key + "_ratio"] = c[key] / b[key] if b[key] else None
    del engine, loaded
    return {
        "config": name,
        "spec": {k: v for k, v in spec.items() if k != "scale_weights"},
        "decoder": {
            "layers": cfg.num_layers,
            "hidden": hidden,
            "intermediate": inter,
            "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
        },
        "params": params,
        "prompt_tokens": len(ids),
        "image_tokens": patches,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "vision_encode_s_min": {k: min(v) for k, v in vision_s.items()},
        "vision_encode_s_all": vision_s,
        "block_size": block_size,
        "kv_bytes_per_token": per_token,
        "build_and_load_s": build_s,
        "cells": cells,
    }


def print_table(res: dict) -> None:
    p = res["params"]
    print(
        f"\n== {res['config']}: vision {p['vision_tower'] / 1e6:.1f}M + projector {p['projector'] / 1e6:.1f}M + LM "
        f"{p['language_model'] / 1e6:.1f}M params, {res['image_tokens']} image tokens, prompt {res['prompt_tokens']}, "
        f"{res['max_tokens']} output tokens; latencies: min of {res['repeats']} (medians in the JSON)"
    )
    v = res["vision_encode_s_min"]
    print(
        f"vision tower + projector per image: {v['plain'] * 1e3:.1f} ms plain, {v['cls_attention'] * 1e3:.1f} ms with "
        f"eager [CLS] attention (min); in every prefill below, pruned or not"
    )
    print(
        f"{'method':6} {'keep':>4} {'kept':>5} {'prefill ms':>10} {'ratio':>6} {'total ms':>9} {'ratio':>6} "
        f"{'KV alloc KiB':>12} {'ratio':>6} {'KV visible KiB':>14} {'ratio':>6} {'LM FLOPs':>8} {'same':>5}"
    )
    for c in res["cells"]:
        fl = f"{c['lm_prefill_flops_ratio']:.2f}" if c["lm_prefill_flops_ratio"] is not None else "-"
        print(
            f"{c['method']:6} {c['keep']:>4} {c['kept_image_tokens']:>5} {c['prefill_s_min'] * 1e3:>10.1f} {c['prefill_s_min_ratio']:>6.2f} "
            f"{c['total_s_min'] * 1e3:>9.1f} {c['total_s_min_ratio']:>6.2f} {c['kv_allocated_bytes'] / 1024:>12.0f} "
            f"{c['kv_allocated_bytes_ratio']:>6.2f} {c['kv_visible_bytes'] / 1024:>14.0f} {c['kv_visible_bytes_ratio']:>6.2f} "
            f"{fl:>8} {c['same_tokens_as_keep1']!s:>5}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base336", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny-repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/visual_pruning.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(
            f"warning: load average {load_start[0]:.2f}; timings are noisy (compare ratios within this run)"
        )
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            reps = args.tiny_repeats if name == "tiny" else args.repeats
            res = bench_config(name, args.max_tokens, reps, Path(tmp))
            print_table(res)
            results.append(res)
    # the paper's setting for reference: LLaVA-1.5-13B decoder (40 x 5120, MLP 13824), 576 image tokens,
    # ~ 40 text tokens of prompt, FastV K = 2
    n13 = 576 + 40
    ref = {
        f"fastv_keep_{k}": lm_prefill_flops(n13, round(576 * (1 - k)), 40, 5120, 13824, 2)
        / lm_prefill_flops(n13, 0, 40, 5120, 13824, None)
        for k in KEEPS
    }
    ref.update(
        {
            f"cls_keep_{k}": lm_prefill_flops(n13, round(576 * (1 - k)), 40, 5120, 13824, None)
            / lm_prefill_flops(n13, 0, 40, 5120, 13824, None)
            for k in KEEPS
        }
    )
    print(
        "\nanalytic LM prefill FLOPs ratio, LLaVA-1.5-13B shape (616-token prompt): "
        + ", ".join(f"{k} {v:.2f}" for k, v in ref.items())
    )
    load_end = os.getloadavg()
    print(f"load average start {load_start}, end {load_end}; wall {time.time() - started:.0f}s")
    out = {
        "benchmark": "visual_pruning",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "wall_s": time.time() - started,
        "args": vars(args),
        "results": results,
        "llava_1_5_13b_lm_prefill_flops_ratio": ref,
        "note": "random weights: cost only. Timings on a shared 2-core CPU; compare ratios within one run.",
    }
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
