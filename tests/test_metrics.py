"""phitune's evaluate metric modules, loaded by local path, against values worked out by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

METRICS = Path(__file__).resolve().parents[1] / "src" / "phitune" / "metrics"


@pytest.fixture(scope="module")
def load():
    import evaluate

    cache = {}

    def _load(name):
        if name not in cache:
            # by path: evaluate.load("exact_match") would need the Hub
            cache[name] = evaluate.load(str(METRICS / name), keep_in_memory=True)
        return cache[name]

    return _load


def test_every_module_is_an_evaluate_metric(load):
    import evaluate

    for name in ("exact_match", "token_f1", "rouge_l", "bleu"):
        assert isinstance(load(name), evaluate.Metric), name


def test_suite_loads_the_same_modules():
    from phitune.evaluation.suite import METRICS_DIR

    assert METRICS_DIR.resolve() == METRICS.resolve()


def test_exact_match(load):
    em = load("exact_match")
    preds = ["Hello  world\n", "hello world", "Reset it."]
    refs = ["Hello world", "Hello world", "Reset it"]
    # default: only whitespace is normalised -> "Hello world" == "Hello world"; the case
    # and the final "." differ -> 1 of 3
    assert em.compute(predictions=preds, references=refs)["exact_match"] == pytest.approx(1 / 3)
    # ignore_case: "hello world" now matches too -> 2 of 3
    assert em.compute(predictions=preds, references=refs, ignore_case=True)["exact_match"] == pytest.approx(2 / 3)
    # and ignore_punctuation: "Reset it." -> "Reset it" -> 3 of 3
    assert em.compute(predictions=preds, references=refs, ignore_case=True,
                      ignore_punctuation=True)["exact_match"] == pytest.approx(1.0)
    assert em.compute(predictions=[], references=[])["exact_match"] == 0.0


def test_token_f1(load):
    f1 = load("token_f1")
    out = f1.compute(predictions=["the cat sat on the mat", "Open Settings"],
                     references=["the cat is on the mat", "open the settings page."])
    # 1: pred {the x2, cat, sat, on, mat} (6), ref {the x2, cat, is, on, mat} (6);
    #    common = the x2 + cat + on + mat = 5 -> P = R = 5/6, F1 = 5/6
    # 2: lower-cased, "." dropped: pred [open, settings] (2), ref [open, the, settings, page] (4);
    #    common 2 -> P = 2/2 = 1, R = 2/4 = 1/2, F1 = 2 * 1 * 1/2 / (3/2) = 2/3
    # mean F1 = (5/6 + 2/3) / 2 = (5/6 + 4/6) / 2 = 3/4; mean P = (5/6 + 1) / 2 = 11/12; mean R = (5/6 + 1/2) / 2 = 2/3
    assert out["token_f1"] == pytest.approx(0.75)
    assert out["token_precision"] == pytest.approx(11 / 12)
    assert out["token_recall"] == pytest.approx(2 / 3)
    # order does not matter to a bag of words: [mat, the, on] vs [the, cat, on, the, mat]:
    # common 3 -> P = 1, R = 3/5, F1 = 2 * 3/5 / (8/5) = 3/4
    assert f1.compute(predictions=["mat the on"], references=["the cat on the mat"])["token_f1"] == pytest.approx(0.75)
    # nothing in common -> 0; both empty -> 1
    assert f1.compute(predictions=["yes", ""], references=["no", "..."])["token_f1"] == pytest.approx(0.5)


def test_rouge_l(load):
    rl = load("rouge_l")
    out = rl.compute(predictions=["the cat sat on the mat", "mat the on"],
                     references=["The cat is on the mat!", "the cat on the mat"])
    # 1: LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5;
    #    P = 5/6, R = 5/6, F = 5/6
    # 2: LCS([mat, the, on], [the, cat, on, the, mat]) = "the on" = 2 ("mat" is last in the
    #    reference, so nothing can follow it); P = 2/3, R = 2/5,
    #    F = 2 * (2/3)(2/5) / (2/3 + 2/5) = (8/15) / (16/15) = 1/2
    # mean F = (5/6 + 1/2) / 2 = 2/3; mean P = (5/6 + 2/3) / 2 = 3/4; mean R = (5/6 + 2/5) / 2 = 37/60
    assert out["rouge_l"] == pytest.approx(2 / 3)
    assert out["rouge_l_precision"] == pytest.approx(3 / 4)
    assert out["rouge_l_recall"] == pytest.approx(37 / 60)


def test_lcs_length():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rouge_l_mod", METRICS / "rouge_l" / "rouge_l.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS): BCBA
    assert mod.lcs_length([], list("abc")) == 0


def test_bleu_single_sentence(load):
    bleu = load("bleu")
    out = bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on a mat"])
    # 1-grams: the x2 (ref has 1: clipped to 1), cat, sat, on, mat -> 5/6
    # 2-grams: [the cat, cat sat, sat on] match; [on the, the mat] do not -> 3/5
    # 3-grams: [the cat sat, cat sat on] match; [sat on the, on the mat] do not -> 2/4
    # 4-grams: [the cat sat on] matches; [cat sat on the, sat on the mat] do not -> 1/3
    # product = 5/6 * 3/5 * 1/2 * 1/3 = 1/12; c = r = 6 -> BP = 1; BLEU = (1/12)^(1/4) = 0.5372849...
    assert out["precisions"] == pytest.approx([5 / 6, 3 / 5, 1 / 2, 1 / 3])
    assert out["brevity_penalty"] == 1.0
    assert out["bleu"] == pytest.approx(12 ** -0.25)
    assert out["bleu"] == pytest.approx(0.5372849659)


def test_bleu_corpus_level_with_brevity_penalty(load):
    bleu = load("bleu")
    out = bleu.compute(predictions=["the cat sat on the mat", "the cat"],
                       references=[["the cat sat on a mat"], ["the cat sat on the mat"]])
    # counts are summed over the corpus before dividing (not a mean of sentence BLEUs):
    # p1 = (5 + 2) / (6 + 2) = 7/8; p2 = (3 + 1) / (5 + 1) = 2/3; p3 = (2 + 0) / (4 + 0) = 1/2;
    # p4 = (1 + 0) / (3 + 0) = 1/3; c = 6 + 2 = 8, r = 6 + 6 = 12 -> BP = exp(1 - 12/8) = exp(-1/2)
    # BLEU = exp(-1/2) * (7/8 * 2/3 * 1/2 * 1/3)^(1/4) = exp(-1/2) * (7/72)^(1/4) = 0.33868...
    assert out["precisions"] == pytest.approx([7 / 8, 2 / 3, 1 / 2, 1 / 3])
    assert out["brevity_penalty"] == pytest.approx(math.exp(-0.5))
    assert out["bleu"] == pytest.approx(math.exp(-0.5) * (7 / 72) ** 0.25)
    assert (out["translation_length"], out["reference_length"]) == (8, 12)


def test_bleu_short_prediction_smoothing_and_closest_reference(load):
    bleu = load("bleu")
    # "the cat" has no 3- or 4-gram: p3 = p4 = 0/0 -> 0 -> BLEU 0 without smoothing
    plain = bleu.compute(predictions=["the cat"], references=["the cat sat on the mat"])
    assert plain["bleu"] == 0.0
    # add-one smoothing: p1 = (2+1)/(2+1) = 1, p2 = (1+1)/(1+1) = 1, p3 = p4 = (0+1)/(0+1) = 1;
    # c = 2, r = 6 -> BP = exp(1 - 6/2) = exp(-2) = 0.1353...; BLEU = exp(-2)
    smoothed = bleu.compute(predictions=["the cat"], references=["the cat sat on the mat"], smooth=True)
    assert smoothed["bleu"] == pytest.approx(math.exp(-2))
    # two references: r is the length closest to c = 2: "the cat ." has 3 tokens (the "."
    # is a token), "the cat sat on the mat" 6 -> r = 3, BP = exp(1 - 3/2) = exp(-1/2)
    multi = bleu.compute(predictions=["the cat"], references=[["the cat sat on the mat", "the cat ."]], smooth=True)
    assert multi["reference_length"] == 3
    assert multi["bleu"] == pytest.approx(math.exp(-0.5))
    # case-sensitive unless lowercase=True: "The" != "the" -> p1 = (1+1)/(2+1) = 2/3
    assert bleu.compute(predictions=["The cat"], references=["the cat"], smooth=True)["precisions"][0] == pytest.approx(2 / 3)
    assert bleu.compute(predictions=["The cat"], references=["the cat"], smooth=True, lowercase=True)["bleu"] == pytest.approx(1.0)
