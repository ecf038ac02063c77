"""Generation metrics on hand-made strings with known values."""

import pytest

from tunelab.evaluate.metrics import (contains_cjk, corpus_bleu, exact_match, generation_scores, normalize_answer,
                                      rouge, rouge_pair)


def test_normalize_answer_strips_case_space_and_trailing_punctuation():
    assert normalize_answer("  The capital\t of  FRANCE is Paris.!  ") == "the capital of france is paris"
    assert normalize_answer("答案是北京。") == "答案是北京"
    assert normalize_answer("e.g. Paris") == "e.g. paris"  # inner punctuation is kept


def test_exact_match_uses_normalisation():
    predictions = ["Paris.", "  paris  ", "Lyon", "The  answer is 42!"]
    references = ["paris", "Paris", "Paris", "the answer is 42"]
    assert exact_match(predictions, references) == pytest.approx(75.0)


def test_rouge1_of_prefix_has_known_value():
    # precision 3/3, recall 3/4 -> F1 = 2 * 1 * 0.75 / 1.75
    scores = rouge_pair("the cat sat", "the cat sat down")
    assert scores["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)
    # bigrams: precision 2/2, recall 2/3
    assert scores["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert rouge(["the cat sat"], ["the cat sat down"])["rouge1"] == pytest.approx(100 * 2 * 0.75 / 1.75)


def test_bleu_perfect_match_is_100_and_mismatch_is_lower():
    sentence = "the quick brown fox jumps over the lazy dog"
    assert corpus_bleu([sentence], [sentence]) == pytest.approx(100.0)
    assert corpus_bleu(["the quick brown fox sleeps under the lazy dog"], [sentence]) < 60.0


def test_chinese_bleu_uses_the_zh_tokenizer():
    # With 13a the whole sentence is one "word" and any difference scores 0.
    assert corpus_bleu(["今天天气很好"], ["今天天气很好"]) == pytest.approx(100.0)
    assert 0 < corpus_bleu(["今天天气很好啊"], ["今天天气很好"]) < 100


def test_chinese_rouge_is_scored_through_jieba():
    from rouge_score import rouge_scorer

    prediction, reference = "今天北京的天气很好", "北京今天天气很好"
    default = rouge_scorer.RougeScorer(["rouge1"]).score(reference, prediction)["rouge1"].fmeasure
    assert default == 0.0  # the stock tokenizer drops every CJK character
    assert contains_cjk(prediction)
    assert rouge_pair(prediction, reference)["rouge1"] > 0.5
    assert rouge_pair(reference, reference)["rougeL"] == pytest.approx(1.0)


def test_generation_scores_report_every_metric_and_reject_mismatched_lengths():
    scores = generation_scores(["Paris."], ["Paris"])
    assert set(scores) == {"bleu", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert scores["exact_match"] == 100.0 and scores["rouge1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one reference per prediction"):
        generation_scores(["a", "b"], ["a"])
