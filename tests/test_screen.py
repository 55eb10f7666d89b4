"""The head screen (kernels/screen.py): a greedy step's pick from a float16 copy of a float32 head
must be exactly np.argmax of the full float32 product, whatever the weights and activations.

Controls: adversarial rows whose float16 roundings reverse their order (the screen alone, or a
screen without its bound, picks wrong there), exact ties, padding rows, non-finite inputs, and the
engine's greedy tokens with and without the screen on a full-size GPT-2 checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from llorch_cpud import kernels
from llorch_cpud.kernels import PackedMatrix
from llorch_cpud.kernels.screen import HeadScreen

pytestmark = pytest.mark.skipif(not kernels.available(), reason="C kernels not built")



def full_argmax(head: PackedMatrix, h: np.ndarray) -> np.ndarray:
    return np.argmax(head.matmul(np.ascontiguousarray(h, dtype=np.float32)), axis=1)


@pytest.mark.parametrize("n_out,n_in,scale", [(1000, 64, 0.02), (50257 // 8, 768, 0.1), (333, 96, 30.0),
                                              (4096, 128, 1e-3)])
def test_random_heads_pick_the_full_argmax(n_out, n_in, scale):
    rng = np.random.default_rng(n_out)
    w = (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32)
    head = PackedMatrix.from_dense(w)
    screen = HeadScreen.build(head)
    assert screen is not None
    for trial in range(20):
        h = (rng.standard_normal((1 + trial % 4, n_in)) * rng.choice([0.1, 1.0, 30.0])).astype(np.float32)
        np.testing.assert_array_equal(screen.argmax(h), full_argmax(head, h))
        assert screen.last_candidates < n_out // 4  # the bound selects, it does not fall back


def test_bound_holds_on_every_row():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((2000, 256)) * 0.3).astype(np.float32)
    w[::7] *= 1e-5  # tiny rows: float16 subnormals
    w[3] = 60000.0 * np.sign(w[3])  # near the top of float16's range
    head = PackedMatrix.from_dense(w)
    screen = HeadScreen.build(head)
    for _ in range(10):
        h = (rng.standard_normal((3, 256)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
        a = screen.screen.matmul(h).astype(np.float64)
        e = head.matmul(h).astype(np.float64)
        b = screen.bounds(h)
        assert (np.abs(a - e) <= b).all()
        assert (b < 1e-2 * np.abs(e).max()).all()  # and it is a bound that selects


def test_prefilter_keeps_every_candidate_of_the_full_bound():
    """argmax bounds only rows within 2·max(B) of the best screen value: the candidates must be exactly
    those the bound over every row selects (rows of very unequal norms make max(B) loose)."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((3000, 128)) * rng.choice([0.01, 0.1, 1.0, 5.0], size=(3000, 1))).astype(np.float32)
    head = PackedMatrix.from_dense(w)
    screen = HeadScreen.build(head)
    for trial in range(30):
        h = (rng.standard_normal((1 + trial % 8, 128)) * rng.choice([0.01, 1.0, 20.0])).astype(np.float32)
        got = screen.argmax(h)
        a = screen.screen.matmul(h).astype(np.float64)
        b = screen.bounds(h) + 1e-12 * np.abs(a)
        every = np.nonzero((a + b >= (a - b).max(axis=1, keepdims=True)).any(axis=0))[0]
        assert screen.last_candidates == len(every)
        np.testing.assert_array_equal(got, full_argmax(head, h))


def adversarial_head(n_in=64, seed=0):
    """Rows A (index 40) and B (index 5) with exact A.h > B.h but float16 B > A, both far above the rest."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((100, n_in)) * 0.01).astype(np.float32)
    g = rng.uniform(0.5, 0.99, n_in).astype(np.float16).astype(np.float64)  # float16 grid values, spacing 2^-11
    u = 2.0**-11
    even = np.arange(n_in) % 2 == 0
    w[40] = g + 0.45 * u  # rounds down to g everywhere
    w[5] = np.where(even, g + 0.55 * u, g + 0.2 * u)  # rounds up on even entries, down on odd ones
    h = np.ones((1, n_in), np.float32)
    return w, h


def test_adversarial_rows_are_rescored():
    w, h = adversarial_head()
    head = PackedMatrix.from_dense(w)
    exact = head.matmul(h)[0]
    approx = HeadScreen.build(head).screen.matmul(h)[0]
    assert exact[40] > exact[5] and approx[5] > approx[40]  # the construction does what it says
    assert np.argmax(approx) == 5  # control: the screen alone picks wrong
    assert HeadScreen.build(head).argmax(h)[0] == 40 == full_argmax(head, h)[0]


def test_a_screen_without_its_bound_would_pick_wrong(monkeypatch):
    w, h = adversarial_head()
    head = PackedMatrix.from_dense(w)
    screen = HeadScreen.build(head)
    monkeypatch.setattr(screen, "bounds", lambda x, rows: np.zeros((x.shape[0], len(rows))))
    assert screen.argmax(h)[0] == 5  # control: with a zero bound only B is rescored, and the pick is wrong


def test_exact_ties_pick_the_first_row():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((300, 32)) * 0.05).astype(np.float32)
    w[30] = w[290] = w[9] = rng.uniform(0.5, 1.0, 32)  # identical top rows in three chunks
    head = PackedMatrix.from_dense(w)
    h = np.ones((2, 32), np.float32)
    np.testing.assert_array_equal(HeadScreen.build(head).argmax(h), [9, 9])


def test_padding_rows_never_win_when_every_logit_is_negative():
    rng = np.random.default_rng(2)
    w = -np.abs(rng.standard_normal((50, 16))).astype(np.float32) - 0.1  # 50 rows: 14 rows of zero padding
    head = PackedMatrix.from_dense(w)
    h = np.abs(rng.standard_normal((3, 16))).astype(np.float32)
    got = HeadScreen.build(head).argmax(h)
    assert (got < 50).all()
    np.testing.assert_array_equal(got, full_argmax(head, h))


def test_batched_rows_pick_as_alone():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((5000, 128)) * 0.05).astype(np.float32)
    screen = HeadScreen.build(PackedMatrix.from_dense(w))
    h = rng.standard_normal((8, 128)).astype(np.float32)
    alone = [screen.argmax(h[i : i + 1])[0] for i in range(8)]
    np.testing.assert_array_equal(screen.argmax(h), alone)


def test_non_finite_activations_fall_back_to_the_full_product():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((400, 32)) * 0.05).astype(np.float32)
    head = PackedMatrix.from_dense(w)
    screen = HeadScreen.build(head)
    h = rng.standard_normal((2, 32)).astype(np.float32)
    h[1, 3] = np.nan
    np.testing.assert_array_equal(screen.argmax(h), full_argmax(head, h))
    assert screen.last_candidates == 400


def test_heads_it_cannot_screen():
    w = np.ones((64, 16), np.float32)
    assert HeadScreen.build(w) is None  # a plain array (no kernels)
    assert HeadScreen.build(PackedMatrix.from_dense(w.astype(np.float16), np.float16)) is None  # already 16-bit
    big = w.copy()
    big[3, 3] = 70000.0  # beyond float16
    assert HeadScreen.build(PackedMatrix.from_dense(big)) is None
    big[3, 3] = np.inf
    assert HeadScreen.build(PackedMatrix.from_dense(big)) is None


def test_engine_greedy_tokens_match_the_full_logits(gpt2_full):
    """The real GPT-2 124M shape: served greedy tokens with the screen equal those from the full logits,
    in a batch that also holds a sampled request (which still gets full logits)."""
    from llorch_cpud.engine import Engine, Request
    from llorch_cpud.formats import load_model
    from llorch_cpud.sampling import SamplingParams

    model, tok, _ = load_model(str(gpt2_full))
    assert model.head_screen is not None
    engine = Engine(model, tok)

    def run(prompts, screen):
        model.head_screen = screen
        seqs = [engine.start(Request(prompt=p, max_tokens=24, seed=3,
                                     sampling=SamplingParams(temperature=0.0 if i < 2 else 0.8)))
                for i, p in enumerate(prompts)]
        while not all(s.done for s in seqs):
            engine.step(seqs)
        return [s.generated for s in seqs]

    screen = model.head_screen
    prompts = ["The meaning of life is", "def fibonacci(n):", "Once upon a time"]
    with_screen = run(prompts, screen)
    assert screen.last_candidates > 0
    assert with_screen == run(prompts, None)
    model.head_screen = screen


def test_real_smollm2_head_in_float32_screens_to_a_few_rows(smollm2_gguf):
    """Real weights, real logit distributions: SmolLM2's tied embedding as a float32 head, the final-normed
    hidden state of every prompt position. Each pick equals the full argmax, and the bound leaves only a
    handful of rows to rescore (measured: median 1, at most 3 of 49152)."""
    from llorch_cpud.formats import load_model
    from llorch_cpud.models.base import Segment
    from llorch_cpud.models.llama import final_norm

    model, tok, _ = load_model(str(smollm2_gguf))
    head = PackedMatrix.from_dense(model.weights.head.dequantize())
    screen = HeadScreen.build(head)
    counts = []
    for text in ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4,", "asdkj qwe zzxv"]:
        ids = tok.encode(text)
        hidden = model.forward(np.array(ids), [Segment(model.new_cache(len(ids)), 0, len(ids))])
        h = final_norm(hidden, model.weights, model.config)  # [seq, n_embd]
        for i in range(h.shape[0]):
            assert screen.argmax(h[i : i + 1])[0] == full_argmax(head, h[i : i + 1])[0]
            counts.append(screen.last_candidates)
        np.testing.assert_array_equal(screen.argmax(h), full_argmax(head, h))  # all positions as one batch
    assert np.median(counts) <= 4 and max(counts) <= 64
