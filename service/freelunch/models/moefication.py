"""Training-free MoEfication: a dense Llama-family checkpoint -> a Hugging Face Qwen2-MoE checkpoint.

Design (issue 6):
- Each layer's MLP neurons (rows of gate/up, columns of down) are split, never changed:
  * a *shared expert*: the `shared_fraction` of neurons with the largest mean |SiLU(gate)*up| on a
    calibration text. Qwen2-MoE multiplies it by sigmoid(shared_expert_gate(x)), a Linear without bias.
    We set that gate's weights to exactly 0, so sigmoid(0) = 0.5 for every token, and scale the shared
    expert's down_proj by 2: exact, no approximation.
  * E routed experts of the rest, clustered by co-activation: balanced k-means (equal sizes, as Qwen2-MoE
    needs) on each neuron's normalised |activation| pattern over the calibration tokens.
- Router per layer: a ridge least-squares fit, from the MLP's input (post-norm hidden state) to each expert's
  activation mass sum_{n in expert} |act_n| on the calibration tokens, scaled by a tiny factor
  (`router_scale`). top-k picks by rank, which a positive scale keeps; with `norm_topk_prob=True` the
  softmax over tiny logits gives each chosen expert a weight of 1/k (to ~router_scale relative error), and
  each routed expert's down_proj is multiplied by k. So with top_k = E the MoE equals the dense MLP to
  float error, and with top_k < E it is the dense MLP with the unpicked experts' neurons dropped.
- Attention, norms, embeddings are copied; Qwen2-MoE's q/k/v biases are written as zeros.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

CALIBRATION_TEXT = """\
The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt wind. Every
evening the keeper climbed the spiral stairs, trimmed the wick and watched the ships pass far below.
To bake a simple loaf of bread, mix four cups of flour with a teaspoon of salt, a packet of yeast and warm
water. Knead the dough for ten minutes, let it rise for an hour, shape it, and bake at 220 degrees.
Photosynthesis is the process by which green plants convert light energy into chemical energy. Chlorophyll
absorbs sunlight, and carbon dioxide and water are turned into glucose and oxygen.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
The committee met on Tuesday to discuss the budget for next year. After a long debate, the members agreed to
increase funding for public libraries and to reduce spending on administrative travel.
Q: What is the capital of France? A: The capital of France is Paris, a city known for the Eiffel Tower.
Q: How many legs does a spider have? A: A spider has eight legs.
In 1969, astronauts landed on the Moon for the first time. Neil Armstrong stepped onto the surface and said
that it was one small step for a man and one giant leap for mankind.
My dear friend, thank you so much for the lovely letter. The garden is blooming, the children are growing
fast, and we all hope that you will visit us again before the summer ends.
To solve the equation 3x + 5 = 20, subtract five from both sides to get 3x = 15, then divide by three: x = 5.
The derivative of x squared is two x, and the integral of one over x is the natural logarithm of x.
User: Can you recommend a good book about history? Assistant: Certainly! "Guns, Germs, and Steel" by Jared
Diamond explores why some societies developed faster than others. It is a thoughtful and readable book.
The stock market fell sharply on Monday as investors worried about rising interest rates and slowing growth
in manufacturing. Analysts expect volatility to continue through the end of the quarter.
Rain fell softly on the roof of the cabin. Inside, a fire crackled, and the cat slept curled on a wool blanket
while the kettle began to whistle in the small kitchen.
Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water boils
at a lower temperature, which is why cooking pasta in the mountains takes longer.
The football match ended in a draw after the home team scored a penalty in the final minute of the game.
SELECT name, email FROM users WHERE created_at > '2020-01-01' ORDER BY name;
"""


def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 6, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of x (n, d) into k clusters of exactly n // k rows (n divisible by k)."""
    n = x.shape[0]
    size = n // k
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)  # (n, k)
        # greedy capacity-constrained assignment: most confident (cheapest) pairs first
        order = torch.argsort(dist.flatten())
        labels.fill_(-1)
        counts = [0] * k
        left = n
        for idx in order.tolist():
            i, c = divmod(idx, k)
            if labels[i] >= 0 or counts[c] >= size:
                continue
            labels[i] = c
            counts[c] += 1
            left -= 1
            if left == 0:
                break
        new = torch.stack([x[labels == c].mean(0) for c in range(k)])
        if torch.allclose(new, centroids):
            break
        centroids = new
    return labels


@torch.no_grad()
def collect_activations(model, tokenizer, text: str):
    """Per layer: (mlp input hidden states (T, H), |SiLU(gate)*up| (T, I)) on the calibration text."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    store = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            act = torch.nn.functional.silu(mod.gate_proj(x)) * mod.up_proj(x)
            store[i] = (x, act.abs())
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return [store[i] for i in range(len(model.model.layers))]


def plan_layer(x, act, num_experts: int, shared_fraction: float, ridge: float = 1e-2, seed: int = 0):
    """(shared neuron ids, list of expert neuron ids, router weight (E, H) unscaled)."""
    inter = act.shape[1]
    n_shared = int(round(inter * shared_fraction))
    n_shared = inter - ((inter - n_shared) // num_experts) * num_experts  # routed part divisible by E
    mean = act.mean(0)
    order = torch.argsort(mean, descending=True)
    shared = order[:n_shared].sort().values
    routed = order[n_shared:]
    pattern = act[:, routed].T  # (n_routed, T)
    pattern = pattern / (pattern.norm(dim=1, keepdim=True) + 1e-8)
    labels = balanced_kmeans(pattern, num_experts, seed=seed)
    experts = [routed[labels == e].sort().values for e in range(num_experts)]
    # router: ridge fit from hidden state to each expert's activation mass
    mass = torch.stack([act[:, e].sum(1) for e in experts], 1)  # (T, E)
    xa = x
    a = xa.T @ xa + ridge * xa.pow(2).sum(1).mean() * torch.eye(xa.shape[1])
    w = torch.linalg.solve(a, xa.T @ mass).T  # (E, H)
    # unit scale: the largest calibration logit is 1 before `router_scale`, so the softmax stays ~uniform
    w = w / ((xa @ w.T).abs().max() + 1e-12)
    return shared, experts, w


def convert(
    src: Path,
    out: Path,
    num_experts: int = 8,
    top_k: int = 4,
    shared_fraction: float = 0.5,
    router_scale: float = 1e-4,
    calibration_text: str = CALIBRATION_TEXT,
    seed: int = 0,
    model=None,
    tokenizer=None,
) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeConfig

    src, out = Path(src), Path(out)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    c = model.config
    acts = collect_activations(model, tokenizer, calibration_text)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    new = {}
    n_shared = None
    for k, v in sd.items():
        if ".mlp." not in k:
            new[k] = v
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, n in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads), ("v_proj", c.num_key_value_heads)):
            new.setdefault(p + f"self_attn.{proj}.bias", torch.zeros(n * head_dim))
        gate, up, down = (sd[p + f"mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        x, act = acts[i]
        shared, experts, w = plan_layer(x, act, num_experts, shared_fraction, seed=seed + i)
        n_shared = len(shared)
        m = p + "mlp."
        new[m + "gate.weight"] = (w * router_scale).contiguous()
        for e, ids in enumerate(experts):
            new[m + f"experts.{e}.gate_proj.weight"] = gate[ids].contiguous()
            new[m + f"experts.{e}.up_proj.weight"] = up[ids].contiguous()
            new[m + f"experts.{e}.down_proj.weight"] = (down[:, ids] * top_k).contiguous()
        # always written (zero-size when there is no shared neuron), so no loader initialises them at random
        new[m + "shared_expert.gate_proj.weight"] = gate[shared].contiguous()
        new[m + "shared_expert.up_proj.weight"] = up[shared].contiguous()
        new[m + "shared_expert.down_proj.weight"] = (down[:, shared] * 2.0).contiguous()
        new[m + "shared_expert_gate.weight"] = torch.zeros(1, c.hidden_size)
    if c.tie_word_embeddings:
        new.pop("lm_head.weight", None)
    moe_size = (c.intermediate_size - n_shared) // num_experts
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 10000.0)}
    cfg = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters=dict(rope),
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
        num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_size,
        shared_expert_intermediate_size=n_shared, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], qkv_bias=True, output_router_logits=False, router_aux_loss_coef=0.0,
    )
    cfg.architectures = ["Qwen2MoeForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / "moefication.json").write_text(json.dumps(dict(
        source=str(src), num_experts=num_experts, top_k=top_k, shared_fraction=shared_fraction,
        shared_expert_intermediate_size=n_shared, moe_intermediate_size=moe_size, router_scale=router_scale,
        seed=seed, method="shared=top mean|act|, co-activation balanced k-means, ridge router on expert mass"), indent=2))
    return out


DEFAULT_MOEFIED_NAME = "SmolLM2-135M-Instruct-moefied-e8-k4-s0.5"


def cached_default_moefied(path: Path | None = None) -> Path:
    """The default model MoEfied with `convert`'s defaults (8 experts, top-4, 50% shared), converted
    once (about a minute) into `path` or the freelunch cache, and reused after that."""
    import os

    from freelunch.models.loader import cache_dir, default_model_path, gguf_to_folder

    target = path or cache_dir() / DEFAULT_MOEFIED_NAME
    if (target / "model.safetensors").exists():
        return target
    print(f"MoEfying the default model into {target} (about a minute)", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    convert(gguf_to_folder(default_model_path()), tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@torch.no_grad()
def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return float(torch.exp(nll))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=None, help="dense HF folder (default: the default model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--shared-fraction", type=float, default=0.5)
    ap.add_argument("--router-scale", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    src = a.src
    if src is None:
        from freelunch.models.loader import default_model_path, gguf_to_folder

        src = gguf_to_folder(default_model_path())
    out = convert(src, Path(a.out), a.experts, a.top_k, a.shared_fraction, a.router_scale, seed=a.seed)
    print(out)


if __name__ == "__main__":
    main()
