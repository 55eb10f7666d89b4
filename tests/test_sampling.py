"""Sampling against transformers' logits processors, and the seeded draw."""

import numpy as np
import pytest

from llorch_cpud.errors import InvalidRequest
from llorch_cpud.sampling import (SamplingParams, apply_repetition_penalty, filter_probs, make_rng, sample,
                                  softmax_probs)

torch = pytest.importorskip("torch")
from transformers.generation import logits_process as lp  # noqa: E402

rng0 = np.random.default_rng(0)
LOGITS = (rng0.standard_normal(1000) * 3).astype(np.float32)


def hf_probs(logits, *warpers, temperature=1.0):
    scores = torch.from_numpy(logits.astype(np.float64))[None] / temperature
    for w in warpers:
        scores = w(torch.zeros(1, 1, dtype=torch.long), scores)
    return torch.softmax(scores, -1)[0].numpy()


def ours_probs(logits, params):
    z = logits.astype(np.float64)
    if params.top_k:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    return filter_probs(softmax_probs(z, params.temperature), params)


def test_greedy_below_threshold_is_argmax():
    for t in (0.0, 1e-7, 9e-7):
        assert sample(LOGITS, SamplingParams(temperature=t), make_rng(1)) == int(np.argmax(LOGITS))


def test_softmax_sums_to_one_and_matches_torch():
    for t in (0.3, 1.0, 2.0):
        p = softmax_probs(LOGITS, t)
        assert abs(p.sum() - 1) < 1e-12
        assert np.abs(p - hf_probs(LOGITS, temperature=t)).max() < 1e-12


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k_support_matches_transformers(k):
    ours = ours_probs(LOGITS, SamplingParams(top_k=k))
    theirs = hf_probs(LOGITS, lp.TopKLogitsWarper(k))
    assert np.array_equal(ours > 0, theirs > 0) and np.abs(ours - theirs).max() < 1e-12


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_support_matches_transformers(p):
    ours = ours_probs(LOGITS, SamplingParams(top_p=p))
    theirs = hf_probs(LOGITS, lp.TopPLogitsWarper(p))
    assert np.array_equal(ours > 0, theirs > 0)
    assert np.abs(ours - theirs).max() < 1e-9


@pytest.mark.parametrize("m", [0.05, 0.2, 0.7])
def test_min_p_support_matches_transformers(m):
    ours = ours_probs(LOGITS, SamplingParams(min_p=m))
    theirs = hf_probs(LOGITS, lp.MinPLogitsWarper(m))
    assert np.array_equal(ours > 0, theirs > 0)
    assert np.abs(ours - theirs).max() < 1e-9


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    history = [3, 17, 17, 999, 0]
    ours = apply_repetition_penalty(LOGITS, history, penalty)
    proc = lp.RepetitionPenaltyLogitsProcessor(penalty)
    theirs = proc(torch.tensor([history]), torch.from_numpy(LOGITS.copy())[None])[0].numpy()
    assert np.array_equal(ours, theirs)


def test_same_seed_same_tokens_different_seed_differs():
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = [sample(LOGITS, params, r) for r in [make_rng(42)] for _ in range(50)]
    b = [sample(LOGITS, params, r) for r in [make_rng(42)] for _ in range(50)]
    c = [sample(LOGITS, params, r) for r in [make_rng(43)] for _ in range(50)]
    assert a == b and a != c


def test_sampling_frequencies_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    r = make_rng(0)
    draws = np.bincount([sample(logits, SamplingParams(), r) for _ in range(4000)], minlength=3) / 4000
    assert np.abs(draws - [0.5, 0.3, 0.2]).max() < 0.03


def test_top_k_1_is_greedy_even_at_high_temperature():
    r = make_rng(5)
    assert {sample(LOGITS, SamplingParams(temperature=2.0, top_k=1), r) for _ in range(20)} == {int(np.argmax(LOGITS))}


@pytest.mark.parametrize("params", [SamplingParams(temperature=-0.1), SamplingParams(temperature=2.5),
                                    SamplingParams(top_p=1.5), SamplingParams(top_k=-1),
                                    SamplingParams(min_p=-0.1), SamplingParams(repetition_penalty=3.0)])
def test_invalid_params_rejected(params):
    with pytest.raises(InvalidRequest):
        params.check()


def test_seed_must_be_uint64():
    make_rng(2**64 - 1)
    with pytest.raises(InvalidRequest, match="seed"):
        make_rng(2**64)


# ---------------------------------------------------------------- the fast paths against the plain ones


def plain_sample(logits, params, rng, history=()):
    """The sampler written plainly: full stable sort for top-p, numpy's Generator.choice for the draw."""
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    if params.top_k > 0 and params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    e = np.exp(z / params.temperature - (z / params.temperature).max())
    probs = e / e.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep_n = int(np.searchsorted(np.cumsum(probs[order]), params.top_p, side="left")) + 1
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep_n]] = True
        probs = np.where(mask, probs, 0.0)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    probs = probs / probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


def test_sample_draws_the_plain_samplers_tokens():
    """Same seed, same token as the plain version, over vocabularies up to GPT-2's, exact ties (rounded
    logits), every filter, and top-p sets from a few tokens to more than the first 1024 sorted."""
    g = np.random.default_rng(7)
    draws = 0
    for trial in range(1500):
        vocab = int(g.choice([7, 3000, 50257]))
        logits = (g.standard_normal(vocab) * g.choice([0.3, 3.0, 10.0])).astype(np.float32)
        if trial % 4 == 0:
            logits = np.round(logits)
        params = SamplingParams(temperature=float(g.choice([0.3, 1.0, 1.7])), top_k=int(g.choice([0, 0, 5, 40])),
                                top_p=float(g.choice([1.0, 0.5, 0.9, 0.999])), min_p=float(g.choice([0.0, 0.05])),
                                repetition_penalty=float(g.choice([1.0, 1.3])))
        seed = int(g.integers(0, 2**63))
        a, b = make_rng(seed), make_rng(seed)
        history = list(g.integers(0, vocab, 10))
        for _ in range(3):
            assert sample(logits, params, a, history) == plain_sample(logits, params, b, history)
            draws += 1
    assert draws == 4500


def test_top_p_on_a_large_vocabulary_matches_transformers():
    logits = (np.random.default_rng(8).standard_normal(50257) * 2).astype(np.float32)
    for p in (0.3, 0.9, 0.99999):  # the last needs more than the first 1024 tokens: the full sort
        ours = ours_probs(logits, SamplingParams(temperature=1.0, top_p=p))
        ref = hf_probs(logits, lp.TopPLogitsWarper(p))
        assert ((ours > 0) == (ref > 0)).all()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-15)


def test_draw_rejects_a_nan_distribution():
    from llorch_cpud.sampling import draw

    with pytest.raises(ValueError, match="positive finite sum"):
        draw(np.array([0.5, np.nan, 0.5]), make_rng(0))


# ---------------------------------------------------------------- degenerate but allowed parameters (sampling.py's docstring)


def strict_sample(logits, params, rng, history=()):
    """sample() with every numpy floating-point warning turned into an error (a NaN on the way would warn)."""
    import warnings

    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):  # underflow is fine
        warnings.simplefilter("error")
        return sample(logits, params, rng, history)


@pytest.mark.parametrize("penalty", [0.0, 1e-300, 1e-7])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_repetition_penalty_near_zero_repeats_the_strongest_seen_token(penalty, temperature):
    """Below 1e-6 the penalty acts as 1e-6: the seen token with the largest positive logit wins outright."""
    history = [3, 17, 999]
    seen_positive = [t for t in history if LOGITS[t] > 0]
    assert seen_positive, "the fixture needs a seen token with a positive logit"
    best = max(seen_positive, key=lambda t: LOGITS[t])
    r = make_rng(3)
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
    assert {strict_sample(LOGITS, params, r, history) for _ in range(20)} == {best}
    out = apply_repetition_penalty(LOGITS, history, penalty)
    assert np.isfinite(out).all()
    assert np.array_equal(out, apply_repetition_penalty(LOGITS, history, 1e-6))


def test_repetition_penalty_zero_with_only_negative_seen_logits_is_finite():
    history = [int(i) for i in np.flatnonzero(LOGITS < 0)[:5]]
    out = apply_repetition_penalty(LOGITS, history, 0.0)
    assert np.isfinite(out).all() and np.abs(out[history]).max() < 1e-4  # negative logits x 1e-6: ~0
    strict_sample(LOGITS, SamplingParams(temperature=0.7, repetition_penalty=0.0), make_rng(0), history)


def test_top_p_zero_keeps_only_the_top_token_and_min_p_one_keeps_the_ties():
    top = int(np.argmax(LOGITS))
    p = ours_probs(LOGITS, SamplingParams(top_p=0.0))
    assert np.flatnonzero(p).tolist() == [top] and p[top] == 1.0
    tied = LOGITS.copy()
    tied[[5, 9]] = tied.max()  # three tokens share the largest logit
    p = ours_probs(tied, SamplingParams(min_p=1.0))
    assert sorted(np.flatnonzero(p).tolist()) == sorted({5, 9, top}) and np.allclose(p[p > 0], 1 / 3)
    p = ours_probs(tied, SamplingParams(top_p=0.0))
    assert np.flatnonzero(p).tolist() == [min(5, 9, top)]  # ties: the lowest id
    for params in (SamplingParams(top_p=0.0, temperature=2.0), SamplingParams(min_p=1.0, temperature=1e-6)):
        assert strict_sample(LOGITS, params, make_rng(1)) == top


@pytest.mark.parametrize("temperature", [1e-6, 2e-6, 1e-4])
def test_tiny_temperature_above_the_greedy_threshold_is_finite_and_picks_the_top(temperature):
    assert not SamplingParams(temperature=temperature).greedy
    r = make_rng(2)
    assert {strict_sample(LOGITS, SamplingParams(temperature=temperature), r) for _ in range(10)} == {int(np.argmax(LOGITS))}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_an_error_not_a_token(bad):
    logits = LOGITS.copy()
    logits[7] = bad
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)):
        with pytest.raises(ValueError, match="non-finite"):
            sample(logits, params, make_rng(0))
