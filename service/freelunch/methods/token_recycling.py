"""Token Recycling (Luo et al. 2024): lossless speculative decoding from recycled candidates.

State: an adjacency table A [vocab, k], A[t] = the top-k next tokens last seen after token t,
shared by every request of the model (the paper's "inherit"). Each step:
  draft   tree[n] = A[tree[parent[n]], rank[n]], from the last accepted token (the root);
  verify  one forward over the tree, each node seeing the committed context + its ancestors,
          at position = context length + depth;
  accept  walk from the root taking the child equal to the model's argmax; the argmax at the
          last accepted node is the bonus token; only the accepted path's KV is kept;
  update  A[tree[n]] = top-k of the model's logits at node n, for every node.
Beyond the paper, a request's prompt seeds the table before its first draft: each prompt token's
successor in the prompt becomes its first candidate (`AdjacencyTable.seed`). The paper's table
only learns from verified outputs, so a new prompt's words are unknown to it exactly where an
answer copies them (translation, summaries, RAG, code edits); measured on first-seen prompts it
raised the accepted tokens per step by about a quarter (bench/bench_token_recycling.py).
Greedy acceptance is exact: the output equals plain greedy decoding token for token. Requests
that sample (or use penalties / min_tokens, which make the target depend on the path) fall
back to plain decoding and say so in `usage.method_stats.speculative.fallback`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.sampler import top_logprobs
from freelunch.engine.strategy import DecodingStrategy, RowPlan, Sampled, StepContext
from freelunch.methods import OptionError, register, validate_options
from freelunch.methods.spec import MethodOptions, MethodSpec
from freelunch.methods.tree_sizing import RankAcceptance, VerifyCost, best_tree
from freelunch.methods.tree_templates import TEMPLATE_222, DraftTree, sub_template

log = logging.getLogger(__name__)

DEFAULT_K = 8
# Nodes per verify step when it cannot be measured (too few free KV blocks at the first request):
# small on CPUs, where verifying T tokens costs far more than one (bench/bench_token_recycling.py);
# the paper's full 2.2.2 tree (80 nodes) on GPUs.
FALLBACK_TREE_SIZE = {"cpu": 4, "gpu": len(TEMPLATE_222)}
# Forward sizes timed once per model: dense where CPU trees live, sparse up to the full tree;
# after a context of a short chat's length (attention grows with context times tree size).
VERIFY_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32, 48, 81)
VERIFY_CONTEXT = 128
# The default tree is re-chosen from the acceptance counts every this many verify steps.
RECHOOSE_EVERY = 32


MAX_K = 32


class SpeculativeOptions(MethodOptions):
    """`speculative: {"method": "token_recycling" | "none", "tree": "2.2.2" | node count, "k": 8}`."""

    method: Literal["token_recycling", "none"] = Field(
        "token_recycling", description='"none": plain decoding, also under a server default'
    )
    tree: Literal["2.2.2"] | Annotated[int, Field(ge=1, le=len(TEMPLATE_222))] | None = Field(
        None, description="draft tree: the paper's 2.2.2 template, or that many of its most likely nodes; "
        "null: the table's default, learned from the measured verify cost and the acceptance seen"
    )
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="candidates kept per token in the adjacency table")
    jump_forward: bool = Field(
        True, description="with a structured output: draft the text the grammar forces next, where it forces any"
    )


def parse_options(raw: dict[str, Any]) -> tuple[list[tuple[int, ...]] | None, int]:
    """The tree template (None without `tree`: the table's learned default) and k."""
    opts = validate_options("speculative", raw, SpeculativeOptions)
    if opts.tree is None:
        return None, opts.k
    template = TEMPLATE_222 if opts.tree == "2.2.2" else sub_template(opts.tree)
    template = [p for p in template if max(p) < opts.k]  # ranks beyond k have no candidate
    if not template:
        raise OptionError("speculative: the tree is empty for this k", "speculative.tree")
    return template, opts.k


class AdjacencyTable:
    """A [vocab, k] of candidate next tokens; one per model (and k), shared across requests.

    The engine runs one step at a time on one thread, so updates from concurrent requests are
    applied one after another, never torn.
    """

    def __init__(self, vocab: int, k: int) -> None:
        self.table = torch.zeros(vocab, k, dtype=torch.long)
        self.acceptance = RankAcceptance(k)  # what its candidates' ranks are worth, by depth
        self._default: DraftTree | None = None
        self._steps_since_choice = 0

    def default_tree(self, cost: VerifyCost) -> DraftTree:
        """The tree for requests that name none: the most tokens per second under the observed
        acceptance (`tree_sizing.best_tree`), re-chosen every RECHOOSE_EVERY verify steps."""
        if self._default is None or self._steps_since_choice >= RECHOOSE_EVERY:
            self._default = DraftTree.from_template(best_tree(cost, self.acceptance.probabilities()))
            self._steps_since_choice = 0
        return self._default

    def observe(self, ranks: list[int]) -> None:
        self.acceptance.observe(ranks)
        self._steps_since_choice += 1

    def update(self, tokens: torch.Tensor, candidates: torch.Tensor) -> None:
        """tokens [N], candidates [N, k] (top-k of each node's logits): A[tokens[i]] = candidates[i]
        (later nodes win)."""
        self.table[tokens] = candidates

    def seed(self, tokens: list[int]) -> None:
        """Make each token's successor in `tokens` its first candidate, the others moving down one
        rank (the last occurrence wins): the prompt's own continuations, free of any forward."""
        if len(tokens) < 2:
            return
        ids = torch.tensor(tokens)
        before, after = ids[:-1], ids[1:]
        heads, where = torch.unique(before, return_inverse=True)
        last = torch.zeros(len(heads), dtype=torch.long).scatter_reduce_(
            0, where, torch.arange(len(before)), "amax", include_self=False
        )
        first = after[last]
        rows = self.table[heads]
        # keep the row's other candidates in order: drop `first` where it is one (its first copy:
        # a fresh row is all zeros), else the last candidate
        match = rows == first[:, None]
        match &= match.cumsum(1) == 1
        match[:, -1] |= ~match.any(1)
        others = rows[~match].view(len(heads), -1)
        self.table[heads] = torch.cat([first[:, None], others], dim=1)

    def fill(self, root: int, tree: DraftTree) -> torch.Tensor:
        """Draft tokens [N+1] for the tree, breadth-first; node 0 is the root."""
        tokens = torch.empty(tree.size, dtype=torch.long)
        tokens[0] = root
        for nodes in tree.levels:  # one gather per depth: a level's parents are all filled
            tokens[nodes] = self.table[tokens[tree.parent[nodes]], tree.rank[nodes]]
        return tokens


def _greedy(logits: torch.Tensor, top: Any) -> torch.Tensor:
    """argmax per row, as plain decoding picks it (the first of equal maxima), read from the top-k
    where the maximum is unique: one pass over the vocabulary instead of two."""
    values, indices = top
    if values.shape[1] < 2:
        return logits.argmax(-1)
    target = indices[:, 0].clone()
    tied = values[:, 0] == values[:, 1]
    if bool(tied.any()):
        target[tied] = logits[tied].argmax(-1)
    return target


def fallback_reason(request: GenerationRequest) -> str | None:
    p = request.params
    if not p.greedy:
        return "sampling (temperature > 0): plain decoding keeps the distribution exact"
    if p.penalised:
        return "penalties make the target token depend on the draft path"
    if p.min_tokens > 0:
        return "min_tokens masks stop tokens per position"
    return None


def verify_cost(model_info: Any) -> VerifyCost | None:
    """What a forward of T tokens costs this model here: measured once, then kept. None while
    it cannot be measured (the cache is full right now: a later request measures)."""
    state = model_info.shared_state
    if "token_recycling_cost" not in state:
        if model_info.measure_verify_cost is None:
            return None
        try:
            seconds = model_info.measure_verify_cost(context=VERIFY_CONTEXT, sizes=VERIFY_SIZES)
        except MemoryError:
            return None
        state["token_recycling_cost"] = VerifyCost.fit(seconds)
        log.info(
            "Token Recycling: a forward of T tokens costs %s x one token here",
            {t: round(c / seconds[1], 2) for t, c in seconds.items()},
        )
    return state["token_recycling_cost"]


class TokenRecycling(DecodingStrategy):
    name = "speculative"

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: Any) -> None:
        super().__init__(request, main)
        self.fallback = fallback_reason(request)
        template, k = parse_options(request.methods["speculative"])
        tables = model_info.shared_state.setdefault("token_recycling", {})
        # One table per API key (the request's tenant): another tenant's text never shapes a
        # tenant's drafts, so acceptance rates (and latency) reveal nothing about it.
        key = (request.tenant, k)
        if key not in tables:
            tables[key] = AdjacencyTable(model_info.config.vocab_size, k)
        self.table: AdjacencyTable = tables[key]
        # Without a tree of its own, the request drafts with the table's default, which follows
        # the measured cost and the observed acceptance. A request that falls back never drafts.
        measured = None if self.fallback else verify_cost(model_info)
        # A request's own tree may cost at most `max_step_cost` decode steps per verify step: the
        # forward rides in the batch every other request waits on (the paper's tree: ~6x on 2 CPU cores).
        limit = model_info.max_step_cost
        if template is not None and measured is not None:
            cap = measured.max_nodes(limit)
            if len(template) > cap:
                raise OptionError(
                    f"speculative.tree: at most {cap} nodes on this server: verifying {len(template) + 1} tokens "
                    f"costs {measured(len(template) + 1) / measured(1):.1f}x a decode step here, which every request "
                    f"in the batch would wait on (the limit, --max-step-cost, is {limit:g}x)",
                    "speculative.tree",
                )
        self.cost = None if template is not None else measured
        if self.cost is not None:
            self.tree = self.table.default_tree(self.cost)
        elif template is not None:
            self.tree = DraftTree.from_template(template)
        else:
            device = "gpu" if str(model_info.device).startswith("cuda") else "cpu"
            self.tree = DraftTree.from_template(sub_template(1 if self.fallback else FALLBACK_TREE_SIZE[device]))
        self._rows: torch.Tensor | None = None  # the table's rows for the drafted tokens, as drafted
        self.max_len = model_info.max_model_len
        self._draft: torch.Tensor | None = None
        self._step_tree = self.tree  # this step's tree (pruned, or a forced chain, under a grammar)
        self._jumped = False
        self.tokenizer = model_info.tokenizer
        # under a grammar, draft the text it forces (jump-forward) where it forces any
        self.jump_forward = request.methods["speculative"].get("jump_forward", True)
        self.jump_forward_tokens = self.pruned_draft_tokens = 0
        self._seeded = False  # the prompt seeds the table at the first draft (a fallback never drafts)
        self.steps = self.draft_tokens = self.accepted_tokens = self.plain_steps = 0

    def tokens_needed(self) -> int:
        return self.tree.size

    def plan(self, token_budget: int) -> list[RowPlan]:
        seq = self.main
        self._draft = None
        if self.cost is not None:  # the table's default may have changed since the last step
            self.tree = self.table.default_tree(self.cost)
        deepest = int(self.tree.depth.max())
        if (
            self.fallback is not None
            or seq.pending != 1  # still prefilling (or recomputing after preemption)
            or token_budget < self.tree.size
            or seq.num_computed + deepest + 1 >= self.max_len
        ):
            return super().plan(token_budget)
        if not self._seeded:  # at its first draft: requests seed in the order they start drafting
            self.table.seed(seq.token_ids)
            self._seeded = True
        start = seq.num_computed
        tree, draft = self.tree, self.table.fill(seq.token_ids[-1], self.tree)
        self._jumped = False
        if self.constraint is not None:  # draft what the grammar allows, or what it forces
            tree, draft = self._constrained(tree, draft)
        self._step_tree, self._draft = tree, draft
        self._rows = self.table.table[draft]
        n = tree.size
        mask = torch.cat([torch.ones(n, start, dtype=torch.bool), tree.ancestor_mask], dim=1)
        return [
            RowPlan(
                seq,
                draft.tolist(),
                logits_at=list(range(n)),
                positions=(start + tree.depth).tolist(),
                mask=mask,
                advance=False,
            )
        ]

    def _constrained(self, tree: DraftTree, draft: torch.Tensor) -> tuple[DraftTree, torch.Tensor]:
        """The step's draft under a grammar: the text the grammar forces next, as a chain (jump-
        forward), where it forces any; else the table's tree without the nodes the grammar
        rejects (a draft it could never accept would only cost verification)."""
        c = self.constraint
        if self.jump_forward:
            forced = c.forced_text()
            ids = self.tokenizer.encode(forced, add_special_tokens=False)[: tree.size - 1] if forced else []
            if ids:
                self._jumped = True
                self.jump_forward_tokens += len(ids)
                return DraftTree.chain(len(ids)), torch.tensor([int(draft[0]), *ids])
        drafted = draft.tolist()
        keep = [0]

        def visit(node: int) -> None:  # depth-first: the grammar's state follows the path
            for child in tree.children[node]:
                if c.accept(drafted[child]):
                    keep.append(child)
                    visit(child)
                    c.rollback(1)

        visit(0)
        if len(keep) == tree.size:
            return tree, draft
        self.pruned_draft_tokens += tree.size - len(keep)
        keep.sort()
        return tree.subtree(keep), draft[keep]

    def on_logits(self, logits: dict[int, torch.Tensor], ctx: StepContext) -> torch.Tensor | list[Sampled] | None:
        out = logits.get(self.main.seq_id)
        if self._draft is None:
            if out is not None and self.main.pending == 0:
                self.plain_steps += 1
            return super().on_logits(logits, ctx)
        draft, tree = self._draft, self._step_tree
        top = torch.topk(out, self.table.table.shape[1], dim=-1)
        drafted = draft.tolist()
        selected = out
        if self.constraint is None:
            target = _greedy(out, top).tolist()  # the model's greedy choice after each node
            path = [0]
            node = 0
            while True:  # Python lists: a tensor element read costs ~1 us, and this is per step
                want = target[node]
                node = next((c for c in tree.children[node] if drafted[c] == want), -1)
                if node < 0:
                    break
                path.append(node)
        else:
            path, target, selected = self._constrained_walk(out, tree, drafted)
        if not self._jumped:  # a forced chain says nothing of the table's ranks
            self.table.observe(self._ranks(path, target))
        self.table.update(draft, top.indices)
        start = self.main.num_computed
        ctx.commit_kv(self.main, [start + i for i in path])
        tokens = [drafted[i] for i in path[1:]] + [target[path[-1]]]
        self.steps += 1
        self.draft_tokens += tree.size - 1
        self.accepted_tokens += len(path) - 1
        k = self.request.params.logprobs
        if k is None:
            return [Sampled(t) for t in tokens]
        return [Sampled(t, top_logprobs(torch.log_softmax(selected[i], -1), t, k)) for i, t in zip(path, tokens)]

    def _constrained_walk(
        self, out: torch.Tensor, tree: DraftTree, drafted: list[int]
    ) -> tuple[list[int], list[int], torch.Tensor]:
        """Greedy acceptance on the constrained distribution: at each node on the path the target
        is the argmax of its logits under the grammar's state after the path so far. The grammar
        is rolled back afterwards: the engine accepts the tokens it keeps. Returns (path, target
        by node, the constrained logits by node)."""
        c = self.constraint
        target = [-1] * tree.size
        selected = out.clone()
        path, node = [0], 0
        while True:
            selected[node] = c.apply(out[node])
            c.note(out[node], selected[node])
            want = int(torch.argmax(selected[node]))
            target[node] = want
            child = next((n for n in tree.children[node] if drafted[n] == want), -1)
            if child < 0 or not c.accept(want):
                break
            path.append(child)
            node = child
        c.rollback(len(path) - 1)
        return path, target, selected

    def _ranks(self, path: list[int], target: list[int]) -> list[int]:
        """The rank of the model's choice among the drafted-from candidates at each node of the
        accepted path (k: not among them), depth 1 first."""
        rows = self._rows[path].tolist()
        return [row.index(target[n]) if target[n] in row else len(row) for n, row in zip(path, rows)]

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "method": "token_recycling",
            "steps": self.steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_tokens_per_step": (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0,
            "plain_steps": self.plain_steps,
        }
        if self.fallback:  # it never drafted: no tree to report (its placeholder is not one)
            stats["fallback"] = self.fallback
        else:
            stats["tree_nodes"] = self.tree.size - 1
        if self.constraint is not None:
            stats |= {"jump_forward_tokens": self.jump_forward_tokens, "pruned_draft_tokens": self.pruned_draft_tokens}
        return stats


SPEC = register(
    MethodSpec(
        option="speculative",
        options=SpeculativeOptions,
        description="Token Recycling (Luo et al. 2024): lossless speculative decoding for greedy requests",
        build=TokenRecycling,
        fallback=fallback_reason,
        off=lambda options: options.get("method") == "none",
    )
)
