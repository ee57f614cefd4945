"""A request's decoding as a pipeline of stages that methods fill; composition is stacking them.

  prefill transform  the main row's prompt changes before or inside its forward (visual pruning)
  row expansion      shadow rows beside the main row, each with its own KV cache, in the same batch:
                     a method's *variants* (guidance: conditional / unconditional prompt; SCMoE:
                     strong / weak routing); with several, the rows are their product
  combination        the rows' logits -> one distribution, innermost method first (contrast inside
                     guidance); a plausibility mask from the main rows is applied last
  constraints        the engine's (logit bias, grammars), on the combined distribution
  selection          sampling by the engine, or draft-and-verify on every row (Token Recycling)

Guidance over SCMoE (docs/composition.md), rows cond-strong, cond-weak, uncond-strong, uncond-weak:
  c = (1 + b) cs - b cw,  u = (1 + b) us - b uw   (log-softmax values, unmasked)
  g = log_softmax(u) + scale * (log_softmax(c) - log_softmax(u)),  then g = -inf where cs is
  implausible (cs < log(alpha) + max cs). No -inf enters a subtraction, so no NaN.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch

from freelunch.engine import plugins
from freelunch.engine.model_info import ModelInfo
from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.strategy import DecodingStrategy, ImageEncoder, RowPlan, Sampled, StepContext

# Under a constraint, masked tokens are pushed this far down instead of to -inf: the same selection
# whenever the constraint allows an unmasked token (exp(-1e4) is 0 in float32), and the constraint's
# best masked token, by score, when it allows none.
SOFT_MASK = 1e4


@dataclasses.dataclass(slots=True)
class Variant:
    """One row of a row-expanding stage. Variant 0 of every stage is the main row's."""

    prompt: list[int] | None = None  # None: the main row's tokens
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-row model inputs (routing)


class Stage:
    """What a method contributes to the pipeline; every hook is optional (a no-op here).

    `order` sorts row-expanding stages from innermost (combined first) to outermost."""

    option: str = ""
    order: int = 0

    # prefill transform
    def image_features(self, encoder: ImageEncoder, pixel_values: torch.Tensor) -> list[torch.Tensor] | None:
        """The images' embeddings (None: the encoder's own, unpruned)."""
        return None

    def main_plan(self, pipeline: Pipeline, budget: int) -> list[RowPlan] | None:
        """The main row's plan this step when the stage shapes it (None: the plain one)."""
        return None

    # row expansion and combination
    def variants(self) -> list[Variant]:
        """Rows of this stage, variant 0 first; [] for a stage with no rows of its own."""
        return []

    def combine(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The variants' logits [..., vocab] -> (scores [..., vocab], mask of excluded tokens or None)."""
        raise NotImplementedError

    # selection
    def draft(self, pipeline: Pipeline, budget: int) -> Any:
        """A draft to verify on every row this step, or None (a selecting stage overrides)."""
        return None

    def on_plain_step(self) -> None:
        """A step that fed the main row without a draft (prefill, or the selector declined)."""

    def attach(self, pipeline: Pipeline) -> None:
        """Called once the request's rows exist (a check or choice that depends on them)."""

    def caches(self, pipeline: Pipeline, seq: Sequence) -> bool:
        """Whether `seq`'s KV, given its tokens, images and extras, may be shared through the
        prefix cache (False: the stage makes it the request's own)."""
        return True

    # accounting
    def tokens_needed(self) -> int:
        return 1

    def stats(self) -> dict[str, Any] | None:
        return None


class Pipeline(DecodingStrategy):
    """The stages of one request, over its rows."""

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: ModelInfo, stages: list[Stage]) -> None:
        super().__init__(request, main)
        self.stages = stages
        self.transforms = [s for s in stages if type(s).image_features is not Stage.image_features or type(s).main_plan is not Stage.main_plan]
        self.selector = next((s for s in stages if type(s).draft is not Stage.draft), None)
        self.expanders = sorted((s for s in stages if s.variants()), key=lambda s: s.order)
        self.grid: dict[tuple[int, ...], Sequence] = {}  # variant index per expander -> row
        self.extra_tokens: dict[str, int] = {s.option: 0 for s in self.expanders}
        self._planned: dict[int, int] = {}  # seq_id -> tokens fed in the step planned last
        self._last: dict[int, torch.Tensor] = {}  # seq_id -> logits of its current last token
        self._draft: Any = None
        self._build_rows(model_info)
        for stage in stages:
            stage.attach(self)

    # ---- rows ---------------------------------------------------------------------------------
    def _build_rows(self, model_info: ModelInfo) -> None:
        axes = [s.variants() for s in self.expanders]
        longest = self.main.num_tokens
        for index in itertools.product(*(range(len(a)) for a in axes)):
            if not any(index):
                self.grid[index] = self.main
                continue
            variants = [axis[i] for axis, i in zip(axes, index)]
            prompt = next((v.prompt for v in variants if v.prompt is not None), None)
            ids = list(prompt) if prompt is not None else list(self.main.token_ids)
            row = Sequence(ids, len(ids))
            self.grid[index] = row
            self.rows.append(row)
            longest = max(longest, len(ids))
        # every row appends every output token: the request ends (`length`) when one would pass the context
        room = model_info.max_model_len - longest
        if self.request.params.max_tokens > room:
            self.request.params = dataclasses.replace(self.request.params, max_tokens=room)

    def _extras(self, seq: Sequence) -> dict[str, Any]:
        index = next(i for i, s in self.grid.items() if s is seq)
        extras: dict[str, Any] = {}
        for stage, i in zip(self.expanders, index):
            extras |= stage.variants()[i].extras
        return extras

    def _expander_of(self, seq: Sequence) -> list[str]:
        """The options whose non-main variants this row is (what its cost counts against)."""
        index = next(i for i, s in self.grid.items() if s is seq)
        return [stage.option for stage, i in zip(self.expanders, index) if i]

    # ---- planning -----------------------------------------------------------------------------------
    def plan(self, token_budget: int) -> list[RowPlan]:
        self._draft = None
        if self.selector is not None and all(seq.pending == 1 for seq in self.rows):
            self._draft = self.selector.draft(self, token_budget)
            if self._draft is not None:
                return self._record(self._draft.plans(self.rows, self._extras))
        plans: list[RowPlan] = []
        for seq in self.rows:
            plan = None
            if seq is self.main:
                for stage in self.transforms:
                    shaped = stage.main_plan(self, token_budget)
                    if shaped is not None:
                        if not shaped:
                            return self._record(plans)  # wait: the transform needs the whole prompt at once
                        plan = shaped[0]
                        break
            plan = plan or self.plain_plan(seq, token_budget)
            if plan is None:
                continue
            plan.extras.update(self._extras(seq))
            plans.append(plan)
            token_budget -= len(plan.tokens)
        return self._record(plans)

    def _record(self, plans: list[RowPlan]) -> list[RowPlan]:
        # counted when the step runs (on_logits): a plan dropped by preemption never ran
        self._planned = {p.seq.seq_id: len(p.tokens) for p in plans}
        return plans

    def image_features(self, encoder: ImageEncoder, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        for stage in self.transforms:
            features = stage.image_features(encoder, pixel_values)
            if features is not None:
                return features
        return super().image_features(encoder, pixel_values)

    def tokens_needed(self) -> int:
        return max((s.tokens_needed() for s in self.stages), default=1)

    def cache_extras(self, seq: Sequence) -> dict[str, Any] | None:
        if not all(stage.caches(self, seq) for stage in self.stages):
            return None
        return self._extras(seq)

    # ---- results ------------------------------------------------------------------------------------
    def on_logits(self, logits: dict[int, torch.Tensor], ctx: StepContext) -> torch.Tensor | list[Sampled] | None:
        for seq in self.rows[1:]:
            fed = self._planned.get(seq.seq_id, 0)
            for option in self._expander_of(seq):
                self.extra_tokens[option] += fed
        self._planned = {}
        if self._draft is not None:
            rows = [logits[seq.seq_id] for seq in self._ordered_rows()]
            return self.selector.verify(self, self._draft, rows, ctx)
        if self.selector is not None and self.main.seq_id in logits and self.main.pending == 0:
            self.selector.on_plain_step()
        # Chunked prefill (or a tight budget) may give one row its last-token logits a step before
        # another: each row's logits for its current last token wait here for the others'; the
        # sampled token, which every row appends, empties it. A row recomputed after preemption has
        # the same tokens, so a kept entry stays valid (and is overwritten when it comes again).
        for seq in self.rows:
            out = logits.get(seq.seq_id)
            if out is not None and seq.pending == 0:  # this step fed the row's last token
                self._last[seq.seq_id] = out[-1]
        if any(seq.pending > 0 or seq.seq_id not in self._last for seq in self.rows):
            return None  # a row is still prefilling
        return self.combined([self._last[seq.seq_id] for seq in self._ordered_rows()])

    def stage(self, option: str) -> Stage:
        """The stage of a method option."""
        return next(s for s in self.stages if s.option == option)

    def _ordered_rows(self) -> list[Sequence]:
        return [self.grid[i] for i in sorted(self.grid)]

    def combined(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """The rows' logits (grid order, [..., vocab] each) -> the distribution to select from:
        each expander combines its axis, innermost first; masks from the main variants apply last."""
        if not self.expanders:
            return rows[0]
        grid = dict(zip(sorted(self.grid), rows))
        mask = None
        for stage in self.expanders:  # combine the innermost remaining axis
            size = len(stage.variants())
            reduced: dict[tuple[int, ...], torch.Tensor] = {}
            for rest in {k[1:] for k in grid}:
                scores, excluded = stage.combine([grid[(v, *rest)] for v in range(size)])
                reduced[rest] = scores
                if excluded is not None and not any(rest):  # the main path's mask only
                    mask = excluded if mask is None else mask | excluded
            grid = reduced
        (scores,) = grid.values()
        if mask is not None:
            soft = self.constraint is not None  # a constraint must keep a token to choose
            scores = torch.where(mask, scores - SOFT_MASK, scores) if soft else scores.masked_fill(mask, -math.inf)
        return scores

    def append(self, token_id: int) -> None:
        self._last.clear()
        super().append(token_id)

    def method_stats(self) -> dict[str, dict[str, Any]] | None:
        out = {}
        for stage in self.stages:
            stats = stage.stats()
            if stats is None:
                continue
            if getattr(stage, "expands", False):  # a row-expanding method: what its rows cost
                extra = [seq for seq in self.rows if stage.option in self._expander_of(seq)]
                stats = stats | {
                    "extra_rows": len(extra),
                    "extra_prompt_tokens": sum(seq.num_prompt for seq in extra),
                    "extra_tokens": self.extra_tokens.get(stage.option, 0),
                }
            out[stage.option] = stats
        return out or None


def install_methods() -> None:
    """The installed methods (the registry's, `load_methods()`) into the engine's registries, their
    stages composed as one `Pipeline`: where a process builds engines (a worker, the tests, benches)."""
    from freelunch.methods import load_methods

    specs = load_methods()
    plugins.STRATEGIES.clear()
    plugins.STRATEGIES.update(specs)
    plugins.KV_SPLIT_HINTS[:] = [spec.kv_split_hint for spec in specs.values() if spec.kv_split_hint is not None]
    plugins.COMPOSERS[:] = [Pipeline]
