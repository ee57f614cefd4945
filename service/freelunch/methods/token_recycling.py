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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from freelunch.engine.model_info import ModelInfo
from freelunch.engine.request import GenerationRequest, Sequence
from freelunch.engine.sampler import top_logprobs
from freelunch.engine.strategy import RowPlan, Sampled, StepContext
from freelunch.kernels import cpu_kernels
from freelunch.methods import OptionError, validate_options
from freelunch.methods.pipeline import Pipeline, Stage
from freelunch.methods.spec import BenchCase, MethodMetric, MethodOptions, MethodSpec, ServerFlag
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
# Where no tree pays (tree_sizing.best_tree chose none), a request still drafts its likeliest node
# once every PROBE_EVERY steps: the acceptance that decides whether a tree pays stays measured.
PROBE_EVERY = 32
PROBE_TREE = DraftTree.from_template([(0,)])


MAX_K = 32


class SpeculativeOptions(MethodOptions):
    """`speculative: {"method": "token_recycling" | "none", "tree": "2.2.2" | node count, "k": 8}`."""

    method: Literal["token_recycling", "none"] = Field(
        "token_recycling", description='"none": plain decoding, also under a server default'
    )
    tree: Literal["2.2.2"] | int | None = Field(
        None, description=f"draft tree: the paper's 2.2.2 template ({len(TEMPLATE_222)} nodes), or that many "
        f"(1-{len(TEMPLATE_222)}) of its most likely nodes; null: the table's default, learned from the measured "
        "verify cost and the acceptance seen. A server refuses a tree whose verification costs more than "
        "--max-step-cost decode steps on its hardware (the 400 names the largest it takes)",
    )
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="candidates kept per token in the adjacency table")
    jump_forward: bool = Field(
        True, description="with a structured output: draft the text the grammar forces next, where it forces any"
    )

    @field_validator("tree")
    @classmethod
    def _tree_size(cls, tree: str | int | None) -> str | int | None:
        # one message for both forms (pydantic's union error names only the literal's)
        if isinstance(tree, int) and not 1 <= tree <= len(TEMPLATE_222):
            raise ValueError(f'a node count in 1-{len(TEMPLATE_222)}, or "2.2.2"')
        return tree


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
        self._default: dict[int, DraftTree] = {}  # by the rows a request verifies it on
        self._steps_since_choice = 0
        # seconds a verify step spends outside the forward (drafting, acceptance, the table's
        # update, keeping the path's KV), a moving average over verify steps: a tree must also pay this
        self.step_work_s = 0.0

    def default_tree(self, cost: VerifyCost, rows: int = 1) -> DraftTree:
        """The tree for requests that name none: the most tokens per second under the observed
        acceptance (`tree_sizing.best_tree`), for a verify forward over `rows` rows (a guided
        request verifies on both of its rows), re-chosen every RECHOOSE_EVERY verify steps."""
        if self._steps_since_choice >= RECHOOSE_EVERY:
            self._default.clear()
            self._steps_since_choice = 0
        if rows not in self._default:
            scaled = cost if rows == 1 else (lambda tokens: cost(tokens * rows))
            self._default[rows] = DraftTree.from_template(best_tree(scaled, self.acceptance.probabilities(), self.step_work_s))
        return self._default[rows]

    def note_step_work(self, seconds: float) -> None:
        """A verify step's work outside the forward."""
        self.step_work_s = seconds if not self.step_work_s else 0.95 * self.step_work_s + 0.05 * seconds

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


def _topk(scores: torch.Tensor, k: int) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """((values, indices) [N, k] of each row's k best scores, best first; whether equal scores come
    lower index first): the C kernel where it serves (a verify step's table update took ~65 us a
    node with torch.topk, ~5 with it)."""
    library = cpu_kernels.load() if scores.device.type == "cpu" and scores.dtype == torch.float32 else None
    if library is None:
        return tuple(torch.topk(scores, k, dim=-1)), False
    return cpu_kernels.topk(library, scores, k), True


def _greedy(logits: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor], ties_by_index: bool) -> torch.Tensor:
    """argmax per row, as plain decoding picks it (the first of equal maxima), read from the top-k:
    as it is where its ties come lower index first (the C kernel's), else where the maximum is
    unique (torch.topk orders ties as it likes): one pass over the vocabulary instead of two."""
    values, indices = top
    if ties_by_index:
        return indices[:, 0]
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


def verify_cost(model_info: ModelInfo) -> VerifyCost | None:
    """What a forward of T tokens costs this model here: measured once, then kept. None while
    it cannot be measured (the cache is full right now: a later request measures)."""
    state = model_info.shared_state
    if "token_recycling_cost" not in state:
        if model_info.forward_cost is None:
            return None
        try:
            seconds = model_info.forward_cost(context=VERIFY_CONTEXT, sizes=VERIFY_SIZES)
        except MemoryError:
            return None
        state["token_recycling_cost"] = VerifyCost.fit(seconds)
        log.info(
            "Token Recycling: a forward of T tokens costs %s x one token here",
            {t: round(c / seconds[1], 2) for t, c in seconds.items()},
        )
    return state["token_recycling_cost"]


@dataclass(slots=True)
class Draft:
    """One step's draft: the tree and its tokens (node 0 is the root, the last accepted token),
    fed to every row of the request."""

    tree: DraftTree
    tokens: torch.Tensor  # [N] token ids
    table_rows: torch.Tensor  # [N, k] the table's candidates for each drafted token, as drafted
    forced: bool  # a chain of text the grammar forces (jump-forward), not the table's tree

    def plans(self, rows: list[Sequence], extras: Callable[[Sequence], dict[str, Any]]) -> list[RowPlan]:
        """Each row sees its own committed context, then the tree's ancestors (positions by depth)."""
        n, tokens, plans = self.tree.size, self.tokens.tolist(), []
        for seq in rows:
            start = seq.num_computed
            mask = torch.cat([torch.ones(n, start, dtype=torch.bool), self.tree.ancestor_mask], dim=1)
            positions = (start + self.tree.depth).tolist()
            plans.append(RowPlan(seq, tokens, list(range(n)), positions, mask, advance=False, extras=extras(seq)))
        return plans


class TokenRecycling(Stage):
    """The selection stage: drafts from the adjacency table, verifies on the combined (and
    constrained) distribution of every row the request has."""

    option = "speculative"

    def __init__(self, request: GenerationRequest, main: Sequence, model_info: ModelInfo) -> None:
        self.request, self.main = request, main
        self.fallback = fallback_reason(request)
        self.template, k = parse_options(request.methods["speculative"])
        tables = model_info.shared_state.setdefault("token_recycling", {})
        # One table per API key (the request's tenant): another tenant's text never shapes a
        # tenant's drafts, so acceptance rates (and latency) reveal nothing about it.
        key = (request.tenant, k)
        if key not in tables:
            tables[key] = AdjacencyTable(model_info.config.vocab_size, k)
        self.table: AdjacencyTable = tables[key]
        self.model_info = model_info
        self.max_len = model_info.max_model_len
        self.tokenizer = model_info.tokenizer
        # under a grammar, draft the text it forces (jump-forward) where it forces any
        self.jump_forward = request.methods["speculative"].get("jump_forward", True)
        self.cost: VerifyCost | None = None
        self.tree = DraftTree.from_template(sub_template(1))  # until `attach` knows the rows
        self._rows = 1
        self._seeded = False  # the prompt seeds the table at the first draft (a fallback never drafts)
        self.steps = self.draft_tokens = self.accepted_tokens = self.plain_steps = 0
        self.plain_by_cost = 0  # steps where no tree paid here (every PROBE_EVERY-th of them probed)
        self.jump_forward_tokens = self.pruned_draft_tokens = 0
        self._drafting_s = 0.0  # the last draft's

    def attach(self, pipeline: Pipeline) -> None:
        """Choose the tree, now that the rows a verify forward covers are known. Without a tree of
        its own, the request drafts with the table's default, which follows the measured cost and
        the observed acceptance; a request's own tree may cost at most `max_step_cost` decode steps
        per verify (the forward rides in the batch every other request waits on: the paper's tree
        is ~6x on 2 CPU cores). A request that falls back never drafts."""
        self._rows = len(pipeline.rows)
        measured = None if self.fallback else verify_cost(self.model_info)
        limit = self.model_info.max_step_cost
        template = self.template
        if template is not None and measured is not None:
            cap = measured.max_nodes(limit) if self._rows == 1 else max(
                (n for n in range(1, len(TEMPLATE_222) + 1) if measured((n + 1) * self._rows) <= limit * measured(1)), default=1
            )
            if len(template) > cap:
                cost = measured((len(template) + 1) * self._rows) / measured(1)
                raise OptionError(
                    f"speculative.tree: at most {cap} nodes on this server: verifying {len(template) + 1} tokens on "
                    f"{self._rows} row(s) costs {cost:.1f}x a decode step here, which every request in the batch would "
                    f"wait on (the limit, --max-step-cost, is {limit:g}x)",
                    "speculative.tree",
                )
        self.cost = None if template is not None else measured
        if self.cost is not None:
            self.tree = self.table.default_tree(self.cost, self._rows)
        elif template is not None:
            self.tree = DraftTree.from_template(template)
        else:
            device = "gpu" if str(self.model_info.device).startswith("cuda") else "cpu"
            self.tree = DraftTree.from_template(sub_template(1 if self.fallback else FALLBACK_TREE_SIZE[device]))

    def tokens_needed(self) -> int:
        return max(self.tree.size, PROBE_TREE.size)  # a request whose tree has no nodes still probes

    def draft(self, pipeline: Pipeline, budget: int) -> Draft | None:
        started = time.perf_counter()
        if self.cost is not None:  # the table's default may have changed since the last step
            self.tree = self.table.default_tree(self.cost, self._rows)
        tree = self.tree
        if tree.size == 1 and self.fallback is None:  # no tree pays here: decode plainly, probing now and then
            self.plain_by_cost += 1
            if (self.plain_by_cost - 1) % PROBE_EVERY:  # the first such step probes, then every PROBE_EVERY-th
                return None
            tree = PROBE_TREE
        deepest = int(tree.depth.max())
        longest = max(seq.num_computed for seq in pipeline.rows)
        if self.fallback is not None or budget < tree.size * self._rows or longest + deepest + 1 >= self.max_len:
            return None
        main = self.main
        if not self._seeded:  # at its first draft: requests seed in the order they start drafting
            self.table.seed(main.token_ids)
            self._seeded = True
        tokens = self.table.fill(main.token_ids[-1], tree)
        forced = False
        if pipeline.constraint is not None:  # draft what the grammar allows, or what it forces
            tree, tokens, forced = self._constrained(pipeline.constraint, tree, tokens)
        self._drafting_s = time.perf_counter() - started
        return Draft(tree, tokens, self.table.table[tokens], forced)

    def _constrained(self, c: Any, tree: DraftTree, draft: torch.Tensor) -> tuple[DraftTree, torch.Tensor, bool]:
        """The step's draft under a grammar: the text the grammar forces next, as a chain (jump-
        forward), where it forces any; else the table's tree without the nodes the grammar
        rejects (a draft it could never accept would only cost verification)."""
        if self.jump_forward:
            forced = c.forced_text()
            ids = self.tokenizer.encode(forced, add_special_tokens=False)[: tree.size - 1] if forced else []
            if ids:
                self.jump_forward_tokens += len(ids)
                return DraftTree.chain(len(ids)), torch.tensor([int(draft[0]), *ids]), True
        drafted = draft.tolist()
        keep = [0]

        def visit(node: int) -> None:  # depth-first: the grammar's state follows the path
            for child in tree.children[node]:
                if c.accept(drafted[child]):
                    keep.append(child)
                    if not c.finished:  # nothing can follow a grammar's stop token
                        visit(child)
                    c.rollback(1)

        visit(0)
        if len(keep) == tree.size:
            return tree, draft, False
        self.pruned_draft_tokens += tree.size - len(keep)
        keep.sort()
        return tree.subtree(keep), draft[keep], False

    def verify(self, pipeline: Pipeline, draft: Draft, rows: list[torch.Tensor], ctx: StepContext) -> list[Sampled]:
        """Greedy acceptance on the combined distribution of every row ([N, vocab] each): walk from
        the root while the drafted child is the argmax at its parent; the argmax at the last
        accepted node is the bonus token. Every row keeps only the accepted path's KV."""
        started = time.perf_counter()
        combined = pipeline.combined(rows)  # [N, vocab]
        tree, drafted = draft.tree, draft.tokens.tolist()
        top, ties_by_index = _topk(combined, self.table.table.shape[1])
        selected = combined
        if pipeline.constraint is None:
            target = _greedy(combined, top, ties_by_index).tolist()  # the greedy choice after each node
            path = [0]
            node = 0
            while True:  # Python lists: a tensor element read costs ~1 us, and this is per step
                want = target[node]
                node = next((c for c in tree.children[node] if drafted[c] == want), -1)
                if node < 0:
                    break
                path.append(node)
        else:
            path, target, selected = _constrained_walk(pipeline.constraint, combined, tree, drafted)
        if not draft.forced:  # a forced chain says nothing of the table's ranks
            self.table.observe(_ranks(draft.table_rows, path, target))
        self.table.update(draft.tokens, top[1])  # the table learns the combined distribution
        for seq in pipeline.rows:
            start = seq.num_computed
            ctx.commit_kv(seq, [start + i for i in path])
        tokens = [drafted[i] for i in path[1:]]
        if target[path[-1]] >= 0:  # the bonus token (none after a grammar's last token)
            tokens.append(target[path[-1]])
        self.steps += 1
        self.draft_tokens += tree.size - 1
        self.accepted_tokens += len(path) - 1
        self.table.note_step_work(self._drafting_s + time.perf_counter() - started)
        k = self.request.params.logprobs
        if k is None:
            return [Sampled(t) for t in tokens]
        return [Sampled(t, top_logprobs(torch.log_softmax(selected[i], -1), t, k)) for i, t in zip(path, tokens)]

    def on_plain_step(self) -> None:
        self.plain_steps += 1

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "method": "token_recycling",
            "steps": self.steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_tokens_per_step": (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0,
            "plain_steps": self.plain_steps,
        }
        probes = -(-self.plain_by_cost // PROBE_EVERY)  # the first, then every PROBE_EVERY-th
        if self.plain_by_cost > probes:  # said, so that a client sees why its speculation did not speed it up
            stats["plain_steps_by_cost"] = self.plain_by_cost - probes
        if self.fallback:  # it never drafted: no tree to report (its placeholder is not one)
            stats["fallback"] = self.fallback
        else:
            stats["tree_nodes"] = self.tree.size - 1
        if self.jump_forward_tokens or self.pruned_draft_tokens:
            stats |= {"jump_forward_tokens": self.jump_forward_tokens, "pruned_draft_tokens": self.pruned_draft_tokens}
        return stats


def _constrained_walk(c: Any, combined: torch.Tensor, tree: DraftTree, drafted: list[int]) -> tuple[list[int], list[int], torch.Tensor]:
    """Greedy acceptance on the constrained distribution: at each node on the path the target is
    the argmax of its scores under the grammar's state after the path so far. The grammar is
    rolled back afterwards: the engine accepts the tokens it keeps. Returns (path, target by node,
    the constrained scores by node)."""
    target = [-1] * tree.size
    selected = combined.clone()
    path, node = [0], 0
    while True:
        selected[node] = c.apply(combined[node])
        c.note(combined[node], selected[node])
        want = int(torch.argmax(selected[node]))
        target[node] = want
        child = next((n for n in tree.children[node] if drafted[n] == want), -1)
        if child < 0 or not c.accept(want):
            break
        path.append(child)
        node = child
        if c.finished:  # the grammar took its stop token: the output ends here, nothing follows
            break
    c.rollback(len(path) - 1)
    return path, target, selected


def _ranks(table_rows: torch.Tensor, path: list[int], target: list[int]) -> list[int]:
    """The rank of the chosen token among the drafted-from candidates at each node of the accepted
    path (k: not among them), depth 1 first."""
    rows = table_rows[path].tolist()
    return [row.index(target[n]) if target[n] in row else len(row) for n, row in zip(path, rows)]


SPEC = MethodSpec(
    option="speculative",
    options=SpeculativeOptions,
    description="Token Recycling (Luo et al. 2024): lossless speculative decoding for greedy requests",
    build=TokenRecycling,
    stages=("selection",),
    fallback=fallback_reason,
    off=lambda options: options.get("method") == "none",
    flags=(
        ServerFlag(
            "--speculative",
            "speculative decoding for every eligible request (a request may opt out with speculative.method=none)",
            ("none", "token_recycling"),
            "none",
            lambda value: {"method": value} if value != "none" else None,
        ),
    ),
    metrics=(
        MethodMetric(
            "freelunch_spec_decode_num_draft_tokens", "Draft tokens proposed by speculative decoding",
            lambda stats: [((), stats.get("draft_tokens", 0))],
        ),
        MethodMetric(
            "freelunch_spec_decode_num_accepted_tokens", "Draft tokens accepted by speculative decoding",
            lambda stats: [((), stats.get("accepted_tokens", 0))],
        ),
    ),
    docs="docs/token_recycling.md",
    bench=BenchCase({"method": "token_recycling"}, lossless=True, per_step="mean_accepted_tokens_per_step"),
    off_options={"method": "none"},
)
