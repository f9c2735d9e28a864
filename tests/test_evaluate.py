"""candlewick.evaluate: BLEU equal to sacrebleu's on sacrebleu's own test cases and on random corpora
(tests/data/bleu-sacrebleu.json, written by scripts/make_bleu_golden.py), NGramLM's distributions summing to one,
and `candlewick eval`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candlewick.evaluate import NGramLM, bleu, bleu_from_counts, corpus_bleu, sentence_bleu, tokenize_13a

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "bleu-sacrebleu.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", GOLDEN, ids=[f"{i}-{c['name']}" for i, c in enumerate(GOLDEN)])
def test_bleu_equals_sacrebleu(case):
    """To 1e-9 of the score (0..100); measured: equal to the last bit on all 351 cases."""
    if case["name"] == "statistics":
        got = bleu_from_counts(case["counts"], case["totals"], case["sys_len"], case["ref_len"], **case["options"])
        assert got.score == pytest.approx(case["score"], abs=1e-9)
    else:
        assert bleu(case["hypotheses"], case["references"], **case["options"]) == pytest.approx(case["score"],
                                                                                               abs=1e-9)


def test_sacrebleu_readme_example():
    """The figures sacrebleu's tests state: 48.530827 with the defaults, 43.91623493 with the intl tokenizer."""
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert bleu(hyps, refs) == pytest.approx(48.530827, abs=1e-6)
    assert bleu(hyps, refs, tokenize="intl") == pytest.approx(43.91623493, abs=1e-6)
    score = corpus_bleu(hyps, refs)
    assert (score.sys_len, score.ref_len, score.counts, score.totals) == (17, 18, [14, 7, 5, 3], [17, 14, 11, 8])
    assert score.bp == pytest.approx(math.exp(1 - 18 / 17))    # one token short of the closest references
    assert sentence_bleu("The dog bit the man.", ["The dog bit the man."]) == pytest.approx(100.0)


def test_bleu_tokenizes_like_mteval():
    assert tokenize_13a("Hello, world. It costs $3.50, &quot;ok&quot;!") == 'Hello , world . It costs $ 3.50 , " ok " !'


def test_bleu_refusals():
    with pytest.raises(ValueError, match="reference streams"):
        bleu(["a b"], ["a b"])
    with pytest.raises(ValueError, match="2 hypotheses"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="smooth_method"):
        bleu(["a"], [["a"]], smooth_method="laplace")


corpora = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=30), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(corpora, st.integers(1, 4), st.sampled_from(["kneser-ney", "add-k"]), st.floats(0.05, 2.0),
       st.floats(0.0, 1.0), st.lists(st.integers(0, 11), max_size=5))
def test_ngram_probabilities_sum_to_one(seqs, order, smoothing, k, discount, context):
    """For any training corpus, order, smoothing and context (seen, unseen, shorter than order - 1, or with
    tokens never seen): P(· | context) sums to 1 over the vocabulary, and prob() agrees with distribution()."""
    lm = NGramLM(order, smoothing=smoothing, k=k, discount=discount, vocab_size=12).fit(seqs)
    p = lm.distribution(context)
    assert p.shape == (12,) and np.all(p >= 0)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert [lm.prob(w, context) for w in range(12)] == pytest.approx(list(p), rel=1e-12, abs=1e-15)


def test_ngram_counts_by_hand():
    """Corpus 0 1 0 2 0 1, V = 3. Add-1 bigram: c(0 ·) = {1: 2, 2: 1}, so P(1 | 0) = (2 + 1) / (3 + 3) = 0.5.
    Kneser-Ney bigram, D = 0.5: P(1 | 0) = (2 - 0.5) / 3 + 0.5 · 2 / 3 · P_cont(1), where the continuation
    unigram P_cont(1) = (N₁₊(• 1) - D) / N₁₊(• •) + D · 3 / N₁₊(• •) · 1/3, N₁₊(• 1) = 1 (only 0 precedes 1),
    N₁₊(• •) = 4 distinct bigrams ((0 1), (1 0), (0 2), (2 0)), 3 words with a continuation."""
    ids = [0, 1, 0, 2, 0, 1]
    add1 = NGramLM(2, smoothing="add-k", k=1.0).fit(ids)
    assert add1.prob(1, [0]) == pytest.approx(0.5)
    kn = NGramLM(2, smoothing="kneser-ney", discount=0.5).fit(ids)
    p_cont_1 = (1 - 0.5) / 4 + 0.5 * 3 / 4 / 3
    assert kn.prob(1, [0]) == pytest.approx(1.5 / 3 + 0.5 * 2 / 3 * p_cont_1)
    assert kn.prob(1) == pytest.approx((2 - 0.5) / 6 + 0.5 * 3 / 6 / 3)     # the first token: the unigram level
    assert kn.perplexity(ids) == pytest.approx(math.exp(kn.token_nll(ids).mean()))
    assert len(kn.token_nll(ids)) == len(ids) - 1


def test_kneser_ney_beats_add_k_on_held_out_text():
    from candlewick.reference import Tokenizer

    tok = Tokenizer.from_pretrained(DATA / "llama-tiny")
    text = (Path(__file__).resolve().parent.parent / "demo" / "genesis.txt").read_text(encoding="utf-8")[:60000]
    ids = tok.encode(text, add_special_tokens=False)
    train, held = ids[:-2000], ids[-2000:]
    kn = NGramLM(3, smoothing="kneser-ney", vocab_size=1024).fit(train).perplexity(held)
    add = NGramLM(3, smoothing="add-k", k=1.0, vocab_size=1024).fit(train).perplexity(held)
    uni = NGramLM(1, vocab_size=1024).fit(train).perplexity(held)
    assert kn < uni < add, (kn, uni, add)


def test_ngram_refusals():
    with pytest.raises(ValueError, match="fit"):
        NGramLM(2).prob(0)
    with pytest.raises(ValueError, match="vocabulary"):
        NGramLM(2, vocab_size=3).fit([0, 1, 2]).prob(5, [0])
    with pytest.raises(ValueError, match="discount"):
        NGramLM(2, discount=1.5)


def test_eval_command_prints_model_and_baselines(capsys):
    from candlewick.cli import main

    readme = str(Path(__file__).resolve().parent.parent / "demo" / "genesis.txt")
    assert main(["eval", str(DATA / "llama-tiny"), readme, "--orders", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["perplexity"]) == {"llama-tiny (llama)", "2-gram, Kneser-Ney", "2-gram, add-0.1"}
    assert out["tokens"] > 1000 and all(v > 1 for v in out["perplexity"].values())
    # random weights of std 0.3: far worse than counting
    assert out["perplexity"]["llama-tiny (llama)"] > out["perplexity"]["2-gram, Kneser-Ney"]
