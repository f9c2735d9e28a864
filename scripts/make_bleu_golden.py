"""Write tests/data/bleu-sacrebleu.json: sacrebleu's BLEU on the cases of sacrebleu's own test suite
(test/test_bleu.py and test/test_sentence_bleu.py of sacrebleu 2.6, copied below) and on seeded random corpora,
for tests/test_evaluate.py to hold candlewick.evaluate.bleu to.

Each case: {"name", "hypotheses", "references" (a list of reference streams), "options" (BLEU's keyword arguments:
tokenize, smooth_method, smooth_value, lowercase, max_ngram_order, effective_order), "score"}; "statistics" cases
hold sacrebleu's BLEU.compute_bleu on given counts instead.

usage: python scripts/make_bleu_golden.py   (needs sacrebleu; not the test suite)
"""
from __future__ import annotations

import json
import pathlib
import random

import sacrebleu
from sacrebleu.metrics import BLEU

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "bleu-sacrebleu.json"

# sacrebleu test/test_bleu.py
REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
RAW = dict(smooth_method="floor", tokenize="none", effective_order=True)  # sacrebleu.raw_corpus_bleu's settings
SUITE = [
    ("raw: no match", ["this is a test", "another test"], [["ref1", "ref2"]], dict(RAW, smooth_value=0.01)),
    ("raw: equal", ["this is a test"], [["this is a test"]], dict(RAW, smooth_value=0.01)),
    ("raw: one word off", ["this is a fest"], [["this is a test"]], dict(RAW, smooth_value=0.01)),
    ("corpus: defaults", HYPS, REFS, {}),
    ("corpus: empty hypotheses", ["", "", ""], REFS, {}),
    ("corpus: tokenize none", HYPS, REFS, {"tokenize": "none"}),
    ("corpus: tokenize 13a", HYPS, REFS, {"tokenize": "13a"}),
    ("corpus: tokenize intl", HYPS, REFS, {"tokenize": "intl"}),
    ("corpus: smooth none", HYPS, REFS, {"smooth_method": "none"}),
    ("effective order: 1 word", ["test"], [["a test"]], dict(RAW, smooth_value=0.01)),
    ("effective order: equal", ["a test"], [["a test"]], dict(RAW, smooth_value=0.01)),
    ("effective order: longer", ["a little test"], [["a test"]], dict(RAW, smooth_value=0.01)),
    ("offset 0", ["am I am a character sequence"], [["I am a symbol string sequence a a"]],
     dict(RAW, smooth_value=0.0)),
    ("offset default", ["am I am a character sequence"], [["I am a symbol string sequence a a"]], dict(RAW)),
] + [(f"max order {n}", HYPS, REFS, {"max_ngram_order": n}) for n in range(1, 7)]

# sacrebleu test/test_sentence_bleu.py (sentence_score: one hypothesis, its references, effective order)
REF, SYS = "producţia de zahăr brut se exprimă în zahăr alb;", \
    "Producția de zahăr primă va fi exprimată în ceea ce privește zahărul alb;"
SENTENCE = [("exp", None, False, "13a"), ("none", None, False, "13a"), ("floor", None, False, "13a"),
            ("floor", 0.1, False, "13a"), ("floor", 0.5, False, "13a"), ("add-k", None, False, "13a"),
            ("add-k", 1, False, "13a"), ("add-k", 2, False, "13a"), ("exp", None, False, "none"),
            ("exp", None, False, "intl"), ("exp", None, False, "char"), ("exp", None, True, "char")]
for method, value, lower, tok in SENTENCE:
    options = dict(smooth_method=method, smooth_value=value, lowercase=lower, tokenize=tok, effective_order=True)
    SUITE.append((f"sentence: {method} {value} {'lc' if lower else 'mixed'} {tok}", [SYS], [[REF]], options))
    SUITE.append((f"sentence zero: {method} {value} {tok}", ["this is a cat"], [["okay thanks"]], options))

# test_bleu.py's test_scoring and test_degenerate_statistics: BLEU.compute_bleu on given statistics
STATISTICS = [([9, 7, 5, 3], [10, 8, 6, 4], 11, 11, "none", None),
              ([0, 0, 0, 0], [4, 4, 2, 1], 0, 1, "floor", 0.0), ([0, 0, 0, 0], [10, 11, 12, 0], 14, 10, "floor", 0.0),
              ([0, 0, 0, 0], [0, 0, 0, 0], 0, 0, "floor", 0.0), ([6, 5, 4, 0], [6, 5, 4, 3], 6, 6, "floor", 0.0),
              ([0, 0, 0, 0], [0, 0, 0, 0], 0, 0, "floor", 0.1), ([0, 0, 0, 0], [0, 0, 0, 0], 1, 5, "floor", 0.01)]

WORDS = ("the a dog cat man bit had bitten him first was not it surprised no one unexpected sat on mat "
         "Dog The MAN 3.5 1,000 2019 - -- ( ) \" ' ; : ! ? & &amp; &quot; < > / ½ € “quoted” l'homme a-b x.y "
         "Straße naïve 東京 ... , .").split(" ")


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 14))]
    text = " ".join(words)
    if rng.random() < 0.3:  # punctuation attached to words, as in detokenized text
        text = text.replace(" ,", ",").replace(" .", ".").replace("( ", "(")
    return text + (rng.choice([".", "!", " .", ""]) if text else "")


def random_cases(n: int) -> list:
    rng, cases = random.Random(19), []
    for i in range(n):
        size, streams = rng.randint(1, 6), rng.randint(1, 3)
        hyps = [sentence(rng) for _ in range(size)]
        refs = [[sentence(rng) if s == 0 or rng.random() > 0.2 else None for _ in range(size)]
                for s in range(streams)]
        for j in range(size):  # sometimes copy most of a reference, so that long n-grams match
            if rng.random() < 0.4 and refs[0][j]:
                words = refs[0][j].split()
                hyps[j] = " ".join(w for w in words if rng.random() > 0.15)
        method = rng.choice(["exp", "floor", "add-k", "none"])
        options = {"tokenize": rng.choice(["13a", "intl", "none", "char"]), "smooth_method": method,
                   "lowercase": rng.random() < 0.3, "effective_order": rng.random() < 0.4,
                   "max_ngram_order": rng.choice([4, 4, 2, 3, 5])}
        if method in ("floor", "add-k") and rng.random() < 0.5:
            options["smooth_value"] = rng.choice([0.01, 0.1, 0.5, 1, 2])
        cases.append((f"random {i}", hyps, refs, options))
    return cases


def main() -> None:
    out = []
    for name, hyps, refs, options in SUITE + random_cases(300):
        score = BLEU(force=True, **options).corpus_score(hyps, refs).score
        out.append({"name": name, "hypotheses": hyps, "references": refs, "options": options, "score": score})
    for counts, totals, sys_len, ref_len, method, value in STATISTICS:
        score = BLEU.compute_bleu(list(counts), list(totals), sys_len, ref_len, smooth_method=method,
                                  smooth_value=value).score
        out.append({"name": "statistics", "counts": counts, "totals": totals, "sys_len": sys_len,
                    "ref_len": ref_len, "options": {"smooth_method": method, "smooth_value": value},
                    "score": score})
    OUT.write_text(json.dumps({"sacrebleu": sacrebleu.__version__, "cases": out}, ensure_ascii=False, indent=0)
                   + "\n", encoding="utf-8")
    print(f"{len(out)} cases -> {OUT}")


if __name__ == "__main__":
    main()
