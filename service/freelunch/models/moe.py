"""Sparse Mixture-of-Experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

Attention, norms, RoPE and the packed batch are the Llama family's (llama.py); only the
feed-forward differs. A MoE block routes each token (expert_routing.py), then runs its experts
grouped by expert: each expert gathers its tokens, runs one matmul pair over them, and its
weighted output is added back in place (`index_add_`). Experts are `MLP`s (nn.Linear), so the
CPU float32 path packs them for oneDNN like every other linear. Experts accumulate into a token
in ascending expert order, as transformers' eager experts do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from freelunch.models.expert_routing import EXPERT_RANK, EXPERT_TOP_K, ExpertRouting, route
from freelunch.kernels import cpu_kernels
from freelunch.models.llama import MLP, CheckpointWeights, DecoderConfig, LlamaForCausalLM, elementwise_library, load_gated_mlp
from freelunch.models.moe_config import MoeConfig


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert, gated by a sigmoid)."""

    def __init__(self, hidden_size: int, moe: MoeConfig) -> None:
        super().__init__()
        self.top_k, self.normalize_top_k = moe.top_k, moe.normalize_top_k
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(hidden_size, moe.expert_intermediate_size) for _ in range(moe.num_experts)
        )
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, routing: ExpertRouting | None = None, triton: bool = False) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; `triton`: the experts through the grouped Triton kernel."""
        stacked = self.stacked_experts() if triton else None
        kernel = self.kernel() if stacked is None and x.dtype == torch.float32 and x.device.type == "cpu" else None
        if kernel is not None:  # routing and experts in one C call, as the one-call decoder runs them
            return kernel.forward(elementwise_library(), x, None if routing is None else (routing.rank, routing.top_k))
        experts, weights = route(self.gate(x), self.top_k, self.normalize_top_k, routing)
        if stacked is not None:  # every expert in two kernel launches, not a matmul per expert
            from freelunch.kernels.moe_triton import grouped_expert_mlp

            out = grouped_expert_mlp(x, experts, weights, *stacked)
        else:
            out = self._run_experts(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The experts' weights stacked as the Triton kernel reads them (gate_up [E, 2I, H], down
        [E, H, I]); each expert's weights become views into them, so they are held once. None where
        an expert's linears are not plain nn.Linear (packed or quantised for the C kernels)."""
        if "_stacked" in self.__dict__:  # checked once: the forward asks at every step
            return self.__dict__["_stacked"]
        linears = [(e.gate_up_proj, e.down_proj) for e in self.experts]
        if not all(type(g) is nn.Linear and type(d) is nn.Linear and g.bias is None and d.bias is None for g, d in linears):
            self.__dict__["_stacked"] = None
            return None
        with torch.no_grad():
            gate_up = torch.stack([g.weight for g, _ in linears])
            down = torch.stack([d.weight for _, d in linears])
            for i, (g, d) in enumerate(linears):
                g.weight = nn.Parameter(gate_up[i], requires_grad=False)
                d.weight = nn.Parameter(down[i], requires_grad=False)
        self.__dict__["_stacked"] = (gate_up, down)
        return gate_up, down

    def kernel_modules(self) -> tuple[nn.Module | None, ...]:
        """The linear modules the C kernel reads (compared by identity: a replaced one rebuilds it)."""
        own = self._modules
        experts = [m for e in own["experts"] for m in (e._modules["gate_up_proj"], e._modules["down_proj"])]
        shared = own.get("shared_expert")
        shared_mods = (shared._modules["gate_up_proj"], shared._modules["down_proj"], own["shared_expert_gate"]) if shared else ()
        return (own["gate"], *experts, *shared_mods)

    def kernel(self) -> cpu_kernels.MoeKernel | None:
        """The block as fl_moe_forward runs it, or None where a weight is not in a C kernel's layout
        (or the C kernels do not run here)."""
        modules = self.kernel_modules()
        built = self.__dict__.get("_kernel")
        if built is None or built[0] != modules:
            built = (modules, self._build_kernel(modules))
            self.__dict__["_kernel"] = built
        return built[1]

    def _build_kernel(self, modules: tuple[nn.Module | None, ...]) -> cpu_kernels.MoeKernel | None:
        if elementwise_library() is None:
            return None
        found = [getattr(m, "kernel_matrix", lambda: None)() for m in modules]
        if any(m is None for m in found):
            return None
        gate, rest = found[0], found[1:]
        experts = list(zip(rest[0 : 2 * len(self.experts) : 2], rest[1 : 2 * len(self.experts) : 2]))
        shared = tuple(rest[2 * len(self.experts) :]) or None
        return cpu_kernels.MoeKernel(gate, experts, self.top_k, self.normalize_top_k, shared)

    def _run_experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token's weighted sum of its experts' outputs; experts [T, k] (-1 = unused slot)."""
        flat_experts = experts.flatten()
        order = torch.argsort(flat_experts, stable=True)  # slots grouped by expert, unused (-1) first
        tokens = order // experts.shape[1]
        slot_weights = weights.flatten()[order]
        # one host sync per layer: how many slots each expert got (index 0 counts the unused ones)
        counts = torch.bincount(flat_experts + 1, minlength=len(self.experts) + 1).tolist()
        out = torch.zeros_like(x)
        start = counts[0]
        for expert, count in zip(self.experts, counts[1:]):
            if count:
                rows = tokens[start : start + count]
                y = expert(x[rows]) * slot_weights[start : start + count, None]
                out.index_add_(0, rows, y.to(out.dtype))
            start += count
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """Llama-family decoder whose feed-forward layers are sparse MoE blocks (where the config says so)."""

    def __init__(self, cfg: DecoderConfig, hf_config) -> None:
        if cfg.moe is None:
            raise ValueError(f"{type(hf_config).__name__} describes no Mixture-of-Experts model")
        super().__init__(cfg, hf_config)

    def routing_override(self, row_inputs: list[tuple[dict[str, Any], int]], device: torch.device) -> ExpertRouting | None:
        """Rows that ask for their own routing (`expert_rank` r: the router's r-th expert alone;
        `expert_top_k`: that many experts), per token; None when every row routes by default."""
        rows = [(extras.get(EXPERT_RANK, 0), extras.get(EXPERT_TOP_K, 0), n) for extras, n in row_inputs]
        return ExpertRouting.from_rows(rows, device)

    def feed_forward(self, layer_idx: int) -> nn.Module:
        if not self.config.moe.sparse_layers[layer_idx]:
            return super().feed_forward(layer_idx)
        return SparseMoeBlock(self.config.hidden_size, self.config.moe)

    def load_feed_forward(self, weights: CheckpointWeights, layer_idx: int, src: str, dst: str) -> None:
        """Experts as transformers saves them (one gate / up / down per expert, Mixtral's w1 / w3 / w2),
        or fused 3-D as transformers holds them in memory (`experts.gate_up_proj` [E, 2I, H],
        `experts.down_proj` [E, H, I], e.g. a saved `model.state_dict()`)."""
        moe = self.config.moe
        if not moe.sparse_layers[layer_idx]:
            return super().load_feed_forward(weights, layer_idx, src, dst)
        fused = src + "mlp.experts."
        if weights.has(fused + "gate_up_proj"):
            block = src + "mlp."
            gate_up, down = weights.get(fused + "gate_up_proj"), weights.get(fused + "down_proj")
            for e in range(moe.num_experts):
                weights.put(f"{dst}experts.{e}.gate_up_proj.weight", gate_up[e])
                weights.put(f"{dst}experts.{e}.down_proj.weight", down[e])
        else:
            block = f"{src}{moe.checkpoint_prefix}."
            for e in range(moe.num_experts):
                load_gated_mlp(
                    weights, f"{block}experts.{e}.", f"{dst}experts.{e}.", moe.checkpoint_expert_names
                )
        weights.put(dst + "gate.weight", weights.get(block + "gate.weight"))
        if moe.shared_expert_intermediate_size:
            load_gated_mlp(weights, block + "shared_expert.", dst + "shared_expert.")
            weights.put(dst + "shared_expert_gate.weight", weights.get(block + "shared_expert_gate.weight"))
