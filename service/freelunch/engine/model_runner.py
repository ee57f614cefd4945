"""One forward over a batch of row plans: pack tokens, build attention metadata, project logits."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from freelunch.engine.block_manager import BlockManager
from freelunch.engine.kv_cache import KVCache
from freelunch.engine.request import Sequence
from freelunch.engine.strategy import RowPlan
from freelunch.models.attention import CPU_PROMPT_MAX_QUERIES, AttentionBatch, AttentionGroup, TokenDropPlan


View = tuple[int, torch.Tensor, torch.Tensor]  # (from layer, [L] slots, [n, L] bool mask)


@dataclass(slots=True)
class _RowLayout:
    """Where a row's tokens sit in the packed batch and what its queries see."""

    q_index: torch.Tensor  # [n] packed indices
    # what layers see, from a layer on (by layer); None: fresh causal prefill from position 0
    views: list[View] | None
    dropped: bool = False  # KV of tokens dropped at an earlier prefill: never in the shared decode group


def _causal_mask(start: int, n: int) -> torch.Tensor:
    """[n, start + n]: query i (at offset start + i) sees offsets <= start + i."""
    return torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, kv: KVCache, blocks: BlockManager, device: torch.device, triton: bool = False
    ) -> None:
        self.model = model
        self.triton = triton  # attention over the cache and MoE experts through the Triton kernels
        self.kv = kv
        self.blocks = blocks
        self.device = device
        cfg = model.config
        self.scale = cfg.head_dim**-0.5
        # A fresh prompt chunk up to this long reads its own keys back from the cache like a draft
        # tree: the C kernels serve its step (up to 64 tokens beside other rows in one call,
        # models/cpu_decoder.py), and it takes the same sums as when found in the prefix cache
        # (models/attention.py CPU_PROMPT_MAX_QUERIES); longer ones attend over their own keys with SDPA.
        self.short_chunk = CPU_PROMPT_MAX_QUERIES if device.type == "cpu" else 0

    @torch.inference_mode()
    def run(self, plans: list[RowPlan]) -> dict[int, torch.Tensor]:
        """Forward all plans together; returns logits [len(logits_at), vocab] per seq_id that asked."""
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        upper_parts: list[torch.Tensor] = []
        layouts: list[_RowLayout] = []
        logit_rows: list[int] = []
        embed_index: list[torch.Tensor] = []
        embed_values: list[torch.Tensor] = []
        offset = 0
        for plan in plans:
            seq, n = plan.seq, len(plan.tokens)
            start = seq.num_computed
            ids.extend(plan.tokens)
            positions.extend(plan.positions if plan.positions is not None else range(start, start + n))
            slot_parts.append(self.blocks.slots(seq, start, start + n))
            if self.blocks.split is not None:
                upper_parts.append(self._upper_slot_mapping(seq, start, n))
            layouts.append(self._layout(plan, offset))
            logit_rows.extend(offset + i for i in plan.logits_at)
            if seq.input_embeds is not None:
                local, values = seq.input_embeds.between(start, start + n)
                embed_index.append(local + offset)
                embed_values.append(values)
            offset += n
        slot_mappings = [(0, torch.cat(slot_parts))]
        if upper_parts:
            slot_mappings.append((self.blocks.split, torch.cat(upper_parts)))
        attn = AttentionBatch(
            self.kv.layers, [(i, m.to(self.device)) for i, m in slot_mappings], self._groups(layouts, offset), self.scale,
            triton=self.triton,
        )
        if any(p.drop_layer is not None for p in plans):
            attn.drop = self._drop_plan(plans, layouts, slot_mappings)
        attn.row_inputs = [(p.extras, len(p.tokens)) for p in plans]  # per-row model inputs, opaque here
        inputs = {}
        if embed_index:  # only models that take images get the keyword
            inputs["input_embeds"] = (torch.cat(embed_index).to(self.device), torch.cat(embed_values))
        hidden = self.model(
            torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), attn, **inputs
        )
        if attn.drop is not None:  # packed indices changed at the pruning layer
            keep_map = {int(old): new for new, old in enumerate(attn.drop.keep.tolist())}
            logit_rows = [keep_map[r] for r in logit_rows]
        logits = self.model.logits(hidden[torch.tensor(logit_rows, dtype=torch.long, device=self.device)])
        logits = logits.cpu()  # one device-to-host transfer for every row of the step
        out: dict[int, torch.Tensor] = {}
        i = 0
        for plan in plans:
            k = len(plan.logits_at)
            if k:
                out[plan.seq.seq_id] = logits[i : i + k]
            i += k
        return out

    def _upper_slot_mapping(self, seq: Sequence, start: int, n: int) -> torch.Tensor:
        """Where a split cache's upper layers write offsets [start, start + n) of `seq`."""
        if seq.upper_packed and seq.drop_kept is None:  # dropped before the split in this very forward:
            return torch.zeros(n, dtype=torch.long)  # `_after_drop` sets the kept ones' slots
        first = seq.upper_count(start)  # packed after a drop: only the kept ones come first
        return self.blocks.upper_slots(seq, torch.arange(first, first + n))

    @torch.inference_mode()
    def forward_cost(
        self, context: int = 64, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 81), repeats: int = 3
    ) -> dict[int, float]:
        """Seconds (best of `repeats`) for one forward of T tokens after `context` cached tokens,
        by T (what verifying a draft tree of T - 1 nodes costs). Holds KV blocks meanwhile;
        MemoryError when too few are free."""
        limit = self.model.config.max_position_embeddings
        context = min(context, limit // 2)
        sizes = tuple(t for t in sizes if context + t <= limit)
        seq = Sequence([0] * context, context)
        self.blocks.allocate(seq, context + max(sizes))
        try:
            self.run([RowPlan(seq, [0] * context, [context - 1])])
            seq.num_computed = context
            plans = {}
            for t in sizes:  # warm-up: the first call at a new shape is slower
                mask = torch.ones(t, context + t, dtype=torch.bool)
                plans[t] = RowPlan(seq, [0] * t, list(range(t)), mask=mask, advance=False)
                self.run([plans[t]])
            # Rounds over all sizes, not one size at a time: a machine whose speed drifts during
            # the measurement then bends no part of the curve more than another.
            cost = {t: float("inf") for t in sizes}
            for _ in range(repeats):
                for t in sizes:
                    start = time.perf_counter()
                    self.run([plans[t]])  # returns logits on the CPU: the device has finished
                    cost[t] = min(cost[t], time.perf_counter() - start)
            return cost
        finally:
            self.blocks.free(seq)

    def _layout(self, plan: RowPlan, offset: int) -> _RowLayout:
        seq, n = plan.seq, len(plan.tokens)
        start = seq.num_computed
        q_index = torch.arange(offset, offset + n)
        if start == 0 and plan.mask is None and seq.dropped_from is None and (n > self.short_chunk or plan.drop_layer is not None):
            return _RowLayout(q_index, None)
        mask = plan.mask if plan.mask is not None else _causal_mask(start, n)
        return _RowLayout(q_index, self._views(seq, mask, start + n), seq.dropped_from is not None)

    def _views(self, seq: Sequence, mask: torch.Tensor, end: int) -> list[View]:
        """What a row's queries see of offsets [0, end) in each layer range: its lower table, then
        its upper table from the cache's split; tokens dropped from layer K are hidden from K on
        where the table still holds them (a packed upper table does not)."""
        kv = self.blocks.slots(seq, 0, end)
        views: list[View] = [(0, kv, mask)]
        dropped_from, split = seq.dropped_from, self.blocks.split
        gone = seq.dropped_offsets() if dropped_from is not None else None
        if dropped_from is not None and (split is None or dropped_from < split):
            views.append((dropped_from, kv, _hide(mask, gone)))
        if split is not None:
            order = seq.upper_order(end)
            upper = (split, self.blocks.upper_slots(seq, torch.arange(order.numel())), mask[:, order])
            views.append(upper)
            if dropped_from is not None and dropped_from > split:  # not packed: offsets in order
                views.append((dropped_from, upper[1], _hide(upper[2], gone)))
        return views

    def _groups(self, layouts: list[_RowLayout], total: int) -> list[AttentionGroup]:
        """Single-token rows with a plain cache view share one padded group; the rest go alone."""
        dev = self.device
        singles = [lay for lay in layouts if lay.q_index.numel() == 1 and lay.views is not None and not lay.dropped]
        groups: list[AttentionGroup] = []
        host_index: list[torch.Tensor] = []  # each group's q_index on the host
        if singles:
            views = []
            for v, (start, _, _) in enumerate(singles[0].views):  # the same layer ranges for every plain row
                longest = max(lay.views[v][1].numel() for lay in singles)
                kv_index = torch.zeros(len(singles), longest, dtype=torch.long)
                mask = torch.zeros(len(singles), 1, longest, dtype=torch.bool)
                for r, lay in enumerate(singles):
                    _, index, row_mask = lay.views[v]
                    kv_index[r, : index.numel()] = index
                    mask[r, 0, : index.numel()] = row_mask[0]
                views.append((start, kv_index.to(dev), None if bool(mask.all()) else mask.to(dev)))
            q_index = torch.cat([lay.q_index for lay in singles])
            groups.append(AttentionGroup(q_index.to(dev), len(singles), 1, views))
            host_index.append(q_index)
        for lay in layouts:
            if any(lay is s for s in singles):
                continue
            n = lay.q_index.numel()
            views = None
            if lay.views is not None:
                views = [(start, index[None].to(dev), mask[None].to(dev)) for start, index, mask in lay.views]
            groups.append(AttentionGroup(lay.q_index.to(dev), 1, n, views))
            host_index.append(lay.q_index)
        # checked on the host copy: on a GPU the device one would stall the step for the answer
        if len(groups) == 1 and host_index[0].numel() == total and bool((host_index[0] == torch.arange(total)).all()):
            groups[0].q_index = None  # one group covering the batch in order: no gather/scatter
        return groups

    def _drop_plan(
        self, plans: list[RowPlan], layouts: list[_RowLayout], slot_mappings: list[tuple[int, torch.Tensor]]
    ) -> TokenDropPlan:
        """A prefill transform (one pruning layer per step); rows that select in the forward get a probe:
        their last token's attention over the row at the layer before."""
        layers = {p.drop_layer for p in plans if p.drop_layer is not None}
        if len(layers) != 1:
            raise ValueError("rows of one step must drop tokens at the same layer")
        layer = layers.pop()
        probes = []
        for plan, lay in zip(plans, layouts):
            if plan.drop_layer is None:
                continue
            if plan.seq.num_computed != 0 or plan.mask is not None:
                raise ValueError("pruning applies to a whole prompt prefilled in one step")
            if plan.keep_select is not None:
                if layer < 1:
                    raise ValueError("a selection from attention drops tokens at layer 1 or later")
                probes.append((int(lay.q_index[-1]), lay.q_index.to(self.device)))
        resolve = functools.partial(self._after_drop, plans, layouts, slot_mappings, layer)
        return TokenDropPlan(layer, resolve, probes)

    def _after_drop(
        self,
        plans: list[RowPlan],
        layouts: list[_RowLayout],
        slot_mappings: list[tuple[int, torch.Tensor]],
        layer: int,
        observed: list[torch.Tensor],
    ) -> tuple[torch.Tensor, AttentionBatch]:
        """Kept packed indices, and the metadata for the layers after the pruning layer. When the
        cache is split at or above that layer, a row's upper table, after a drop, is packed with its kept
        tokens and gives back the blocks it no longer needs (its KV there is freed, not hidden)."""
        keep_parts: list[torch.Tensor] = []
        packed_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (new packed indices, upper slots)
        after_layouts: list[_RowLayout] = []
        selections = iter(observed)
        split = self.blocks.split
        new_offset = 0
        for plan, lay in zip(plans, layouts):
            n = lay.q_index.numel()
            if plan.drop_layer is None:
                local_keep = torch.arange(n)
            else:
                chosen = plan.keep_offsets if plan.keep_select is None else plan.keep_select(next(selections))
                local_keep = chosen.cpu().sort().values
            keep_parts.append(lay.q_index[local_keep])
            k = local_keep.numel()
            q_index = torch.arange(new_offset, new_offset + k)
            if plan.drop_layer is None:
                after_layouts.append(_RowLayout(q_index, lay.views, lay.dropped))
            else:  # the kept tokens, in order: causal among themselves
                seq = plan.seq
                if seq.upper_packed and seq.upper_reserved < k:
                    raise RuntimeError(f"the drop keeps {k} tokens; {seq.upper_reserved} were reserved")
                seq.drop_tokens(layer, local_keep, n, packed=split is not None and layer <= split)
                views: list[View] = [(0, self.blocks.slots(seq, 0, n)[local_keep], _causal_mask(0, k))]
                if split is not None:
                    self.blocks.fit_upper(seq, n)
                    upper = self.blocks.upper_slots(seq, torch.arange(k) if seq.upper_packed else local_keep)
                    views.append((split, upper, _causal_mask(0, k)))
                    if seq.upper_packed:
                        packed_rows.append((q_index, upper))
                after_layouts.append(_RowLayout(q_index, views, True))
            new_offset += k
        keep = torch.cat(keep_parts)
        after_mappings = []
        for start, mapping in slot_mappings:
            mapping = mapping[keep]
            if start == split:
                for index, slots in packed_rows:
                    mapping[index] = slots
            after_mappings.append((start, mapping.to(self.device)))
        after = AttentionBatch(
            self.kv.layers, after_mappings, self._groups(after_layouts, new_offset), self.scale, triton=self.triton
        )
        return keep.to(self.device), after


def _hide(mask: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    hidden = mask.clone()
    hidden[:, offsets] = False
    return hidden
