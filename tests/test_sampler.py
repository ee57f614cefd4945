"""Sampling: filters, penalties, greedy, seeds, min_tokens and the sampled distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from freelunch.engine.request import SamplingParams
from freelunch.engine.sampler import SampleRow, apply_penalties, filter_logits, sample


def _logits(seed: int, vocab: int = 64, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


def _row(logits, seed=None, prompt=(), output=(), stop=(), **params) -> SampleRow:
    p = SamplingParams(**params)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRow(logits, p, gen, list(prompt), list(output), tuple(stop))


# ---- references, written independently in float64 numpy -----------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x[np.isfinite(x)].max()
    e = np.where(np.isfinite(x), np.exp(x), 0.0)
    return e / e.sum()


def _ref_kept(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Boolean mask of the tokens that may be sampled."""
    x = logits.astype(np.float64) / temperature
    keep = np.ones(len(x), dtype=bool)
    if 0 < top_k < len(x):
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth
    if top_p < 1.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-probs, kind="stable")
        mass_before = 0.0
        nucleus = np.zeros(len(x), dtype=bool)
        for i in order:
            if not keep[i]:
                break
            nucleus[i] = True
            mass_before += probs[i]
            if mass_before >= top_p:  # the smallest prefix whose mass reaches top_p
                break
        keep &= nucleus
    if min_p > 0.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        keep &= probs >= min_p * probs.max()
    return keep


def _ref_penalties(logits: np.ndarray, prompt, output, rep=1.0, presence=0.0, frequency=0.0) -> np.ndarray:
    x = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        count = sum(1 for o in output if o == t)
        x[t] -= frequency * count + presence
    return x


# ---- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 5},
        {"top_k": 1},
        {"top_k": 63},
        {"top_p": 0.5},
        {"top_p": 0.9, "temperature": 0.7},
        {"top_p": 0.05},  # at least the top token survives
        {"min_p": 0.1},
        {"min_p": 0.3, "temperature": 1.5},
        {"top_k": 10, "top_p": 0.8},
        {"top_k": 20, "top_p": 0.95, "min_p": 0.05, "temperature": 0.8},
    ],
)
def test_filters_match_reference(params):
    for seed in range(20):
        logits = _logits(seed)
        p = SamplingParams(**params)
        out = filter_logits(logits, p)
        kept = torch.isfinite(out).numpy()
        ref = _ref_kept(logits.numpy(), **params)
        assert kept.any()
        np.testing.assert_array_equal(kept, ref, err_msg=f"seed {seed} {params}")
        # surviving entries are the temperature-scaled logits, untouched
        t = params.get("temperature", 1.0)
        np.testing.assert_allclose(out.numpy()[kept], logits.numpy()[kept] / t, rtol=1e-6)


def test_top_k_keeps_ties_and_input_untouched():
    logits = torch.tensor([3.0, 1.0, 3.0, 2.0, 2.0, 0.5])
    before = logits.clone()
    out = filter_logits(logits, SamplingParams(top_k=3))
    # 3, 3, 2 are the top three; the other 2.0 ties with the 3rd and is kept as well
    assert torch.isfinite(out).tolist() == [True, False, True, True, True, False]
    assert torch.equal(logits, before)


def test_filtered_tokens_are_never_sampled():
    logits = _logits(3, vocab=32)
    allowed = _ref_kept(logits.numpy(), top_k=8, top_p=0.7)
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(top_k=8, top_p=0.7, temperature=1.3)
    seen = set()
    for _ in range(400):
        ((tok, _),) = sample([SampleRow(logits, p, gen, [], [], ())])
        seen.add(tok)
    assert seen <= set(np.flatnonzero(allowed).tolist())
    assert len(seen) > 1


# ---- penalties -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rep,presence,frequency",
    [(1.3, 0.0, 0.0), (0.8, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 0.4), (1.2, -0.5, 0.3), (1.5, 1.0, 1.0)],
)
def test_penalties_match_reference(rep, presence, frequency):
    logits = _logits(7, vocab=40)
    prompt = [1, 2, 3, 3, 9, 17]
    output = [3, 4, 4, 4, 20, 9, 39]
    p = SamplingParams(repetition_penalty=rep, presence_penalty=presence, frequency_penalty=frequency)
    got = logits.clone()
    apply_penalties(got, p, prompt, output)
    ref = _ref_penalties(logits.numpy(), prompt, output, rep, presence, frequency)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    # presence/frequency never touch tokens seen only in the prompt
    if rep == 1.0:
        assert got[1] == logits[1] and got[17] == logits[17]


def test_repetition_penalty_sees_prompt_and_output():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    p = SamplingParams(repetition_penalty=2.0)
    got = logits.clone()
    apply_penalties(got, p, prompt_ids=[0, 1], output_ids=[3])
    assert got.tolist() == [1.0, -4.0, 2.0, -4.0, 1.0]


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([5.0, 4.9, 0.0, 0.0])
    before = logits.clone()
    # plain greedy picks 0; having output 0 three times with a frequency penalty picks 1
    ((tok, _),) = sample([_row(logits, temperature=0.0)])
    assert tok == 0
    ((tok, _),) = sample([_row(logits, temperature=0.0, output=[0, 0, 0], frequency_penalty=0.1)])
    assert tok == 1
    ((tok, _),) = sample([_row(logits, temperature=0.0, prompt=[0], repetition_penalty=1.1)])
    assert tok == 1
    ((tok, _),) = sample([_row(logits, temperature=0.0, output=[0], presence_penalty=0.2)])
    assert tok == 1
    # the caller's logits are not modified by the penalties
    assert torch.equal(logits, before)


def test_logprobs_are_from_the_unpenalised_distribution():
    logits = _logits(11, vocab=30)
    rows = [
        _row(logits, temperature=0.0, logprobs=5, output=[int(logits.argmax())] * 3, frequency_penalty=2.0),
        _row(logits, seed=1, temperature=0.8, top_k=4, logprobs=3),
        _row(logits, temperature=0.0, logprobs=0),
    ]
    out = sample(rows)
    ref = torch.log_softmax(logits.double(), -1)
    for (tok, rec), row in zip(out, rows):
        assert rec is not None and rec.token_id == tok
        assert rec.logprob == pytest.approx(float(ref[tok]), abs=1e-5)
        k = row.params.logprobs
        assert len(rec.top) == k
        best = torch.topk(ref, k) if k else None
        if k:
            assert [t for t, _ in rec.top] == best.indices.tolist()
            np.testing.assert_allclose([lp for _, lp in rec.top], best.values.numpy(), atol=1e-5)
    # the penalised greedy row did not pick the raw argmax, yet its logprob is the raw one
    assert out[0][0] != int(logits.argmax())
    assert sample([_row(logits, temperature=0.0)])[0][1] is None  # no logprobs asked: no record


# ---- greedy, seeds, min_tokens ----------------------------------------------------------------


def test_greedy_is_argmax():
    for seed in range(30):
        logits = _logits(seed, vocab=100)
        for params in (
            {"temperature": 0.0},
            {"temperature": 0.7, "top_k": 1},
            {"temperature": 0.0, "top_p": 0.1},
        ):
            ((tok, _),) = sample([_row(logits, **params)])
            assert tok == int(np.argmax(logits.numpy()))


def test_a_batch_mixing_greedy_and_other_rows_gives_each_row_its_own_token():
    """Plain greedy rows share one argmax; rows with penalties, logprobs or sampling keep their own
    treatment, in their place in the batch."""
    logits = [_logits(seed, vocab=100) for seed in range(5)]
    rows = [
        _row(logits[0], temperature=0.0),
        _row(logits[1], temperature=0.0, logprobs=2),
        _row(logits[2], temperature=0.0),
        _row(logits[3], temperature=0.0, repetition_penalty=50.0),
        _row(logits[4], temperature=0.0),
    ]
    rows[3].output_ids = [int(np.argmax(logits[3].numpy()))]  # penalised away
    got = sample(rows)
    alone = [sample([row])[0] for row in rows]
    assert [t for t, _ in got] == [t for t, _ in alone]
    assert [t for t, _ in got][:3] == [int(np.argmax(lg.numpy())) for lg in logits[:3]]
    assert got[3][0] != int(np.argmax(logits[3].numpy()))
    assert got[1][1] is not None and got[1][1].top and got[0][1] is None


def test_seeded_sampling_is_deterministic_and_per_row():
    logits = [_logits(s, vocab=50, scale=1.0) for s in range(40)]

    def run(seed, others=False):
        gen = torch.Generator().manual_seed(seed)
        p = SamplingParams(temperature=1.0, top_p=0.95)
        toks = []
        noise = torch.Generator().manual_seed(999)
        for lg in logits:
            rows = [SampleRow(lg, p, gen, [], toks, ())]
            if others:  # rows of other requests sampled in the same call, with their own generator
                rows = (
                    [SampleRow(lg.flip(0), p, noise, [], [], ())]
                    + rows
                    + [SampleRow(lg * 2, p, noise, [], [], ())]
                )
            res = sample(rows)
            toks.append(res[1 if others else 0][0])
        return toks

    a, b = run(5), run(5)
    assert a == b
    assert run(5, others=True) == a
    assert run(6) != a


def test_min_tokens_masks_stop_ids():
    logits = torch.zeros(10)
    logits[2] = 10.0  # EOS is by far the most likely
    logits[7] = 9.0  # a stop_token_id, next
    stop = (2, 7)
    for params in ({"temperature": 0.0}, {"temperature": 1.0}):
        for n_out in range(3):
            gen = torch.Generator().manual_seed(n_out)
            rows = [_row(logits, output=[5] * n_out, stop=stop, min_tokens=3, **params) for _ in range(50)]
            for r in rows:
                r.generator = gen
            toks = [t for t, _ in sample(rows)]
            assert not set(toks) & set(stop), f"stop id sampled with {n_out} < min_tokens outputs"
        # once min_tokens outputs exist the stop id is allowed again
        ((tok, _),) = sample([_row(logits, seed=0, output=[5] * 3, stop=stop, min_tokens=3, **params)])
        assert tok == 2
    assert logits[2] == 10.0  # masking worked on a copy


# ---- the sampled distribution ------------------------------------------------------------------


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = probs * n
    m = expected > 0
    assert counts[~m].sum() == 0, "a token with zero probability was sampled"
    return float(((counts[m] - expected[m]) ** 2 / expected[m]).sum())


# chi-square critical values at p = 0.001
_CHI2_CRIT = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


@pytest.mark.parametrize(
    "params,dof",
    [
        ({"temperature": 1.0}, 5),
        ({"temperature": 0.6}, 5),
        ({"temperature": 2.0}, 5),
        ({"temperature": 0.9, "top_k": 4}, 3),
        ({"temperature": 1.0, "top_p": 0.8}, None),
    ],
)
def test_empirical_distribution_matches_softmax(params, dof):
    logits = torch.tensor([1.0, 0.5, -0.2, 0.0, 1.4, -1.0])
    gen = torch.Generator().manual_seed(2024)
    p = SamplingParams(**params)
    n = 4000
    counts = np.zeros(6)
    for _ in range(n):
        ((tok, _),) = sample([SampleRow(logits, p, gen, [], [], ())])
        counts[tok] += 1
    x = logits.double().numpy() / params["temperature"]
    kept = _ref_kept(logits.numpy(), **params)
    probs = _softmax(np.where(kept, x, -np.inf))
    dof = dof if dof is not None else int(kept.sum()) - 1
    stat = _chi2(counts, probs)
    assert stat < _CHI2_CRIT[dof], f"chi2 {stat:.1f} with {dof} dof: counts {counts / n} vs {probs}"
    # and it is not the distribution at temperature 1 when the temperature differs
    if params["temperature"] != 1.0 and "top_k" not in params:
        wrong = _softmax(logits.double().numpy())
        assert _chi2(counts, wrong) > 3 * _CHI2_CRIT[dof]
    assert math.isclose(counts.sum(), n)


@pytest.mark.parametrize(
    "extreme",
    [{"top_p": 5e-324}, {"repetition_penalty": 5e-324}, {"temperature": 5e-324}, {"temperature": 1e-7, "top_p": 1e-30}],
)
def test_extreme_but_valid_settings_still_sample_a_token(extreme):
    """Values the API accepts must never make the distribution NaN (found by the API fuzzer)."""
    torch.manual_seed(0)
    logits = torch.randn(64) * 5
    p = SamplingParams(**{"temperature": 1.0, **extreme})
    gen = torch.Generator().manual_seed(1)
    ((tok, _),) = sample([SampleRow(logits, p, gen, [1, 2, 3], [4, 5], ())])
    if p.top_p < 1e-20 or p.temperature < 1e-5:
        assert tok == int(torch.argmax(logits))  # the limit of both is the argmax
    assert 0 <= tok < 64


@pytest.mark.parametrize("penalty", [5e-324, 1e-30, 10.0])
def test_a_masked_token_stays_masked_under_any_repetition_penalty(penalty):
    """min_tokens masks EOS to -inf before penalties; an EOS in the prompt is a seen token, and
    -inf times a penalty that rounds to 0 in float32 was NaN (a 500 found by fuzzing)."""
    logits = torch.randn(50)
    p = SamplingParams(min_tokens=2, repetition_penalty=penalty, temperature=1.0, seed=0)
    rows = [SampleRow(logits, p, torch.Generator().manual_seed(0), [3, 7, 9], [], (3,))]
    token, _ = sample(rows)[0]
    assert token != 3


def test_rows_filtered_together_equal_each_row_filtered_alone():
    """The batched filter (one pass a kind for a step's rows) keeps exactly what each row's own
    parameters keep, whatever its neighbours ask for."""
    from freelunch.engine.sampler import filter_rows

    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(top_p=0.6),
        SamplingParams(temperature=0.5, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
    ]
    logits = torch.stack([_logits(s) for s in range(len(params))])
    together = filter_rows(logits, params)
    for i, p in enumerate(params):
        alone = filter_logits(logits[i], p)
        assert torch.equal(torch.isinf(together[i]), torch.isinf(alone)), f"row {i}"
        assert torch.allclose(together[i], alone, rtol=0, atol=1e-6), f"row {i}"
    # and a seeded draw from a mixed batch is the draw the row makes alone
    rows = lambda: [_row(logits[i], seed=40 + i, **vars_of(p)) for i, p in enumerate(params)]  # noqa: E731
    batch = [t for t, _ in sample(rows())]
    assert batch == [sample([r])[0][0] for r in rows()]


def vars_of(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in ("temperature", "top_k", "top_p", "min_p")}
