"""Caption (BLEU, CIDEr-D), VQA and retrieval metrics against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from mmkit.eval import (
    bleu,
    bleu_scores,
    cider_d,
    normalize_answer,
    recall_at_k,
    tokenize,
    vqa_accuracy,
    vqa_score,
)

# ------------------------------------------------------------------------------------------------
# tokenize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man's T-shirt, 3.5 sizes too big!", "a man 's t-shirt 3.5 sizes too big"),
        ("Two dogs don't like the cat's toy.", "two dogs do n't like the cat 's toy"),
        ('He said "hello" -- loudly...', "he said hello loudly"),
        ("It costs $5 at 10:30; 50% off", "it costs $ 5 at 10:30 50 % off"),
        ("a dog (brown) at the U.S. border", "a dog -lrb- brown -rrb- at the u.s. border"),
        ("people cannot ride", "people can not ride"),
        ("The dogs\u2019 bowls", "the dogs bowls"),
        ("", ""),
    ],
)
def test_tokenize_matches_ptb_conventions(text, expected):
    assert tokenize(text) == expected.split()


# ------------------------------------------------------------------------------------------------
# BLEU
# ------------------------------------------------------------------------------------------------


def test_bleu_exact_match_is_one():
    refs = {0: ["a dog runs on the grass", "something else entirely"], "b": ["two cats sleep on a red sofa"]}
    cands = {0: "a dog runs on the grass", "b": "two cats sleep on a red sofa"}
    result = bleu_scores(cands, refs)
    assert result.scores == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert result.brevity_penalty == 1.0
    assert bleu(cands, refs) == pytest.approx(1.0)


def test_bleu_hand_computed_single_sentence():
    # candidate: the cat sat on the mat  /  reference: the cat is on the mat
    # 1-grams: the x2, cat, on, mat match (sat does not)          -> 5/6
    # 2-grams: "the cat", "on the", "the mat" of 5                -> 3/5
    # 3-grams: "on the mat" of 4                                  -> 1/4
    # 4-grams: none of 3                                          -> 0
    # equal lengths -> no brevity penalty.
    result = bleu_scores({1: "the cat sat on the mat"}, {1: ["the cat is on the mat"]}, tokenizer=str.split)
    assert result.precisions == pytest.approx((5 / 6, 3 / 5, 1 / 4, 0.0))
    assert result.scores[0] == pytest.approx(5 / 6)
    assert result.scores[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert result.scores[2] == pytest.approx(0.5)  # (5/6 * 3/5 * 1/4) ** (1/3) = (1/8) ** (1/3)
    assert result.scores[3] == 0.0
    assert bleu({1: "the cat sat on the mat"}, {1: ["the cat is on the mat"]}, n=3) == pytest.approx(0.5)


def test_bleu_corpus_sums_counts_and_uses_closest_reference_length():
    cands = {"x": "the cat sat on the mat", "y": "a dog"}
    refs = {"x": ["the cat is on the mat"], "y": ["a dog runs", "a big dog runs fast"]}
    # Counts are summed over the corpus before dividing: 1-grams (5 + 2) / (6 + 2), 2-grams
    # (3 + 1) / (5 + 1). Closest reference length for "a dog" (2 tokens) is 3, so c = 8, r = 9.
    result = bleu_scores(cands, refs, n=2)
    assert (result.candidate_length, result.reference_length) == (8, 9)
    assert result.brevity_penalty == pytest.approx(math.exp(1 - 9 / 8))
    assert result.scores[1] == pytest.approx(math.sqrt(7 / 8 * 4 / 6) * math.exp(-1 / 8))


def test_bleu_closest_length_tie_goes_to_shorter_reference():
    # 4 candidate tokens, references of 2 and 6 tokens: both 2 away; the shorter one is used, so the
    # candidate is not too short and there is no brevity penalty.
    result = bleu_scores({0: "a b c d"}, {0: ["a b", "a b c d e f"]}, n=1)
    assert result.reference_length == 2
    assert result.brevity_penalty == 1.0


def test_bleu_clips_repeated_words():
    result = bleu_scores({0: "the the the the"}, {0: ["the cat", "cat the mat"]}, n=1)
    assert result.scores[0] == pytest.approx(1 / 4)


def test_bleu_empty_and_unmatched_candidates_give_zero():
    refs = {0: ["a dog runs"], 1: ["a cat sleeps"]}
    assert bleu({0: "", 1: ""}, refs) == 0.0
    assert bleu({0: "zebra", 1: "giraffe"}, refs) == 0.0
    # One empty candidate among others does not crash and only lowers the score.
    assert 0.0 < bleu({0: "", 1: "a cat sleeps"}, refs, n=1) < 1.0


def test_bleu_rejects_mismatched_keys_and_bad_inputs():
    with pytest.raises(ValueError, match=r"only in candidates: 'extra'.*only in references: 7"):
        bleu({0: "a", "extra": "b"}, {0: ["a"], 7: ["c"]})
    with pytest.raises(TypeError, match="one caption str"):
        bleu({0: ["a dog"]}, {0: ["a dog"]})
    with pytest.raises(TypeError, match="list of caption strs"):
        bleu({0: "a dog"}, {0: "a dog"})
    with pytest.raises(ValueError, match="at least one reference"):
        bleu({0: "a dog"}, {0: []})
    with pytest.raises(ValueError, match="positive int"):
        bleu({0: "a dog"}, {0: ["a dog"]}, n=0)


# ------------------------------------------------------------------------------------------------
# CIDEr-D
# ------------------------------------------------------------------------------------------------

_REFS = {
    0: ["a brown dog runs across the green grass"],
    1: ["a man rides a red bike down the street"],
    2: ["two cats sleep on a soft blue sofa"],
}


def test_cider_hand_computed_unigram_case():
    # N = 2 items; "dog" is in one reference set -> idf = log 2 for both vectors; only unigrams exist,
    # their cosine is 1, orders 2..4 are zero vectors -> 10 * (1 + 0 + 0 + 0) / 4.
    score, per_item = cider_d({0: "dog", 1: "bird"}, {0: ["dog"], 1: ["cat"]})
    assert per_item[0] == pytest.approx(2.5)
    assert per_item[1] == 0.0
    assert score == pytest.approx(1.25)


def test_cider_clips_repeated_ngrams():
    # "dog dog" vs "dog": unigram weights 2w and w -> clipped dot min(2w, w) * w = w^2 over norms
    # 2w * w -> 0.5; the candidate's bigram has no reference counterpart; length differs by 1.
    _, per_item = cider_d({0: "dog dog", 1: "cat"}, {0: ["dog"], 1: ["cat"]})
    assert per_item[0] == pytest.approx(10 * 0.5 * math.exp(-1 / 72) / 4)


def test_cider_identical_candidate_is_maximal_and_disjoint_is_zero():
    exact = {k: v[0] for k, v in _REFS.items()}
    score, per_item = cider_d(exact, _REFS)
    assert per_item[0] == pytest.approx(10.0)
    assert score == pytest.approx(10.0)
    perturbed = [
        "a brown dog runs across the grass",  # word dropped
        "a brown dog runs across the green green grass",  # word repeated
        "a black dog runs across the green grass",  # word replaced
        "the green grass runs across a brown dog",  # reordered
        "a brown dog runs across the green grass quickly today",  # too long
    ]
    for text in perturbed:
        _, item = cider_d({**exact, 0: text}, _REFS)
        assert item[0] < per_item[0], text
    _, item = cider_d({**exact, 0: "two cats sleep on a soft blue sofa"}, _REFS)
    assert item[0] < per_item[0]
    _, item = cider_d({**exact, 0: "zebras graze quietly"}, _REFS)
    assert item[0] == 0.0


def test_cider_length_penalty():
    long = "a brown dog runs across the green grass " + "while it rains hard"  # 4 tokens too many
    cands = {0: long, 1: _REFS[1][0], 2: _REFS[2][0]}
    _, penalised = cider_d(cands, _REFS)
    _, unpenalised = cider_d(cands, _REFS, sigma=1e9)
    assert penalised[0] == pytest.approx(unpenalised[0] * math.exp(-(4**2) / (2 * 6.0**2)))
    assert penalised[0] < unpenalised[0]
    # Items whose candidate has the reference's length are untouched.
    assert penalised[1] == pytest.approx(unpenalised[1])


def test_cider_idf_ignores_words_in_every_reference_set():
    refs = {0: ["a dog"], 1: ["a cat"], 2: ["a bird"]}
    # "a" is in all 3 reference sets: idf = log 3 - log 3 = 0, so matching it earns nothing.
    _, per_item = cider_d({0: "a", 1: "cat", 2: "bird"}, refs)
    assert per_item[0] == 0.0
    assert per_item[1] > 0.0
    # Document frequency comes from references only: a candidate repeating "cat" elsewhere does not
    # change the weight of "cat" for item 1.
    _, again = cider_d({0: "cat", 1: "cat", 2: "bird"}, refs)
    assert again[1] == pytest.approx(per_item[1])


def test_cider_single_item_corpus_scores_zero_and_keys_checked():
    score, per_item = cider_d({"only": "a dog"}, {"only": ["a dog"]})
    assert score == 0.0 and per_item == {"only": 0.0}
    with pytest.raises(ValueError, match="only in references: 2"):
        cider_d({0: "a", 1: "b"}, {0: ["a"], 1: ["b"], 2: ["c"]})
    with pytest.raises(ValueError, match="sigma"):
        cider_d({0: "a"}, {0: ["a"]}, sigma=0.0)


# ------------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),
        ("The Two dogs.", "2 dogs"),
        ("none", "0"),
        ("dont", "don't"),
        ("black/white", "black white"),
        ("yes, it is", "yes it is"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("Yes!", "yes"),
        ("an apple\n", "apple"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _leave_one_out(matches: int, total: int = 10) -> float:
    """The VQAv2 definition, spelled out: mean over the subsets that leave one answer out."""
    answers = [True] * matches + [False] * (total - matches)
    accs = []
    for left_out in range(total):
        subset = answers[:left_out] + answers[left_out + 1 :]
        accs.append(min(sum(subset) / 3, 1.0))
    return sum(accs) / total


def test_vqa_accuracy_leave_one_out_with_ten_answers():
    # m matching of 10: leaving out a matching answer keeps m - 1, any other keeps m.
    # m = 3: (3 * min(2/3, 1) + 7 * 1) / 10 = 0.9;  m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    # m = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3;  m = 4: every subset keeps >= 3 -> 1.0.
    hand = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for m, expected in hand.items():
        answers = ["2"] * m + ["3"] * (10 - m)
        assert vqa_accuracy("2", answers) == pytest.approx(expected)
        assert _leave_one_out(m) == pytest.approx(expected)
    for m in range(11):
        assert vqa_accuracy("2", ["2"] * m + ["3"] * (10 - m)) == pytest.approx(_leave_one_out(m))


def test_vqa_accuracy_normalises_both_sides_and_handles_fewer_answers():
    assert vqa_accuracy("Two", ["2", "two", "2.", "3"] + ["4"] * 6) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["Two", "the two"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0  # one exact answer (procedural sources): exact match, not 1/3
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", "yes")


def test_vqa_score_overall_and_per_type():
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["red"] * 10}
    predictions = {1: "yes", 2: "two", 3: "blue"}
    types = {1: "yes/no", 2: "number", 3: "other"}
    result = vqa_score(predictions, answers, types=types)
    assert result["overall"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert result["num_questions"] == 3
    assert result["per_type"] == pytest.approx({"number": 0.6, "other": 0.0, "yes/no": 1.0})
    assert "per_type" not in vqa_score(predictions, answers)
    with pytest.raises(ValueError, match="only in answers: 3"):
        vqa_score({1: "yes", 2: "2"}, answers)
    with pytest.raises(ValueError, match="no question type for 1 question id"):
        vqa_score(predictions, answers, types={1: "yes/no", 2: "number"})


# ------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------


def test_recall_at_k_hand_built_matrix_with_two_texts_per_image():
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor(
        [
            # t0    t1    t2    t3    t4    t5
            [0.90, 0.10, 0.80, 0.20, 0.30, 0.40],  # image 0: own best 0.9, nothing above -> rank 0
            [0.70, 0.60, 0.50, 0.10, 0.20, 0.30],  # image 1: own best 0.5, 0.7 and 0.6 above -> rank 2
            [0.10, 0.20, 0.30, 0.40, 0.35, 0.05],  # image 2: own best 0.35, 0.4 above -> rank 1
        ]
    )
    result = recall_at_k(sim, text_to_image, ks=(1, 2, 3))
    i2t = result["image_to_text"]
    assert (i2t["R@1"], i2t["R@2"], i2t["R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert i2t["mean_rank"] == pytest.approx(2.0)  # 1-based ranks 1, 3, 2
    assert i2t["median_rank"] == 2.0
    assert i2t["num_queries"] == 3
    # text -> image, column by column: ranks t0 0, t1 2, t2 1, t3 2, t4 0, t5 2.
    t2i = result["text_to_image"]
    assert (t2i["R@1"], t2i["R@2"], t2i["R@3"]) == pytest.approx((2 / 6, 3 / 6, 1.0))
    assert t2i["mean_rank"] == pytest.approx(13 / 6)
    assert t2i["median_rank"] == 2.0  # floor(median(0, 0, 1, 2, 2, 2) = 1.5) + 1
    assert t2i["num_queries"] == 6


def _brute_force_ranks(sim: torch.Tensor, text_to_image: torch.Tensor):
    """Sort every row / column and read off the position of the first correct item."""
    i2t = []
    for i in range(sim.shape[0]):
        own = (text_to_image == i).nonzero().flatten().tolist()
        if own:
            order = sim[i].argsort(descending=True).tolist()
            i2t.append(min(order.index(t) for t in own))
    t2i = [
        sim[:, t].argsort(descending=True).tolist().index(int(text_to_image[t])) for t in range(sim.shape[1])
    ]
    return torch.tensor(i2t), torch.tensor(t2i)


def test_recall_at_k_matches_sorting_with_uneven_texts_and_several_blocks():
    num_images, num_texts = 40, 700  # more texts than one comparison block
    text_to_image = torch.randint(0, num_images - 1, (num_texts,))  # the last image owns no text
    sim = torch.randn(num_images, num_texts, dtype=torch.float64)
    sim[text_to_image, torch.arange(num_texts)] += 1.5  # make retrieval better than chance
    i2t, t2i = _brute_force_ranks(sim, text_to_image)
    result = recall_at_k(sim, text_to_image, ks=(1, 5, 10))
    for ranks, stats in ((i2t, result["image_to_text"]), (t2i, result["text_to_image"])):
        for k in (1, 5, 10):
            assert stats[f"R@{k}"] == pytest.approx((ranks < k).double().mean().item())
        assert stats["mean_rank"] == pytest.approx(ranks.double().mean().item() + 1)
        assert stats["num_queries"] == ranks.numel()
    assert result["image_to_text"]["num_queries"] == len(set(text_to_image.tolist()))


def test_recall_at_k_breaks_ties_against_the_query():
    sim = torch.zeros(4, 8)
    result = recall_at_k(sim, torch.arange(8) // 2, ks=(1, 4))
    assert result["text_to_image"]["R@1"] == 0.0
    assert result["text_to_image"]["R@4"] == 1.0
    assert result["image_to_text"]["R@1"] == 0.0


def test_recall_at_k_rejects_bad_inputs():
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"shape \(num_texts,\) = \(4,\)"):
        recall_at_k(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\); text 3 points to image 5"):
        recall_at_k(sim, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="floating-point"):
        recall_at_k(torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="positive ints"):
        recall_at_k(sim, torch.tensor([0, 1, 2, 2]), ks=(0,))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2, 2]))


def test_eval_table_names_each_connector_by_its_run():
    from mmkit.eval.vlm import connector_label, table

    assert connector_label("outputs/caption-vlap-s1/final") == "caption-vlap-s1/final"
    assert connector_label("outputs/run/step-000400") == "run/step-000400"
    assert connector_label("outputs/caption-vlap-s1-400-final") == "caption-vlap-s1-400-final"
    assert connector_label("final") == "final"
    rows = table([
        {"kind": "vlap", "connector": "outputs/a/final", "caption": {"CIDEr": 1.5, "attribute_accuracy": 0.25}},
        {"kind": "linear", "connector": "outputs/a-400", "vqa": {"overall": 0.125}},
    ]).splitlines()
    assert rows[2].startswith("| vlap (a/final) | 1.500 | - | 25.0 | - |")
    assert rows[3].startswith("| linear (a-400) | - | - | - | 12.5 |")


def test_paired_difference_hand_case_and_separation():
    from mmkit.eval.paired import format_paired, paired_difference

    a = [0.5, 0.5, 0.5, 0.5]
    b = [0.7, 0.6, 0.5, 0.4]
    r = paired_difference(a, b)
    assert r["examples"] == 4 and r["mean_diff"] == pytest.approx(0.05)
    # differences 0.2, 0.1, 0, -0.1: sample sd 0.1291, SE 0.0645
    assert r["stderr"] == pytest.approx(math.sqrt(((0.15**2) + (0.05**2) + (0.05**2) + (0.15**2)) / 3) / 2)
    assert (r["b_wins"], r["b_losses"], r["ties"]) == (2, 1, 1)
    assert r["ci95"][0] <= r["mean_diff"] <= r["ci95"][1] and not r["separated"]
    # a consistent gain over many examples is separated, whatever the resampling seed
    a = [i % 7 / 7 for i in range(200)]
    for seed in range(3):
        assert paired_difference(a, [x + 0.01 for x in a], seed=seed)["separated"]
    assert "+1.0 points" in format_paired("x", paired_difference(a, [x + 0.01 for x in a]))


def test_paired_difference_rejects_bad_inputs():
    from mmkit.eval.paired import paired_difference

    with pytest.raises(ValueError, match="same examples"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1], [1])
    with pytest.raises(ValueError, match="finite"):
        paired_difference([1, float("nan")], [1, 2])


def test_unpairable_says_why_two_reports_cannot_be_paired():
    from mmkit.eval.paired import unpairable

    a = {"ious": [0.5, 0.7], "examples_sha": "abc"}
    assert unpairable(a, dict(a), scores="ious", examples="examples_sha") is None
    assert "different examples (xyz vs abc)" in unpairable(a, {**a, "examples_sha": "xyz"}, scores="ious",
                                                           examples="examples_sha")
    assert "the other report has no per-example scores" in unpairable(a, {"examples_sha": "abc"}, scores="ious",
                                                                       examples="examples_sha")


def test_map_auc_equals_the_pairwise_count_and_reads_the_box():
    from mmkit.eval.seg import map_auc

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 4, size=(3, 4)).astype(float)  # many ties
        truth = rng.random((12, 16)) < 0.3
        cell = scores.repeat(4, 0).repeat(4, 1)  # each pixel's cell score (4 x 4 pixels per cell)
        t, b = cell[truth], cell[~truth]
        brute = ((t[:, None] > b[None, :]).sum() + 0.5 * (t[:, None] == b[None, :]).sum()) / (t.size * b.size)
        assert map_auc(scores, truth) == pytest.approx(brute)
    scores = np.array([[0.0, 1.0], [0.0, 0.0]])
    truth = np.zeros((10, 10), dtype=bool)
    truth[2:6, 6:10] = True  # exactly the top-right cell of the box [2, 2, 10, 10]
    assert map_auc(scores, truth, box=(2, 2, 10, 10)) == 1.0
    assert map_auc(scores, truth) < 1.0  # the same map laid over the whole image misses part of the target
    truth[:] = False
    truth[2:6, 2:6] = True
    assert map_auc(scores, truth, box=(2, 2, 10, 10)) < 0.5 and map_auc(scores, np.zeros((4, 4), bool)) is None


def test_paired_vqa_lines_per_kind_skip_kinds_too_small_to_pair():
    from mmkit.eval.vlm import paired_vqa_lines

    kinds = ["order", "order", "order", "av"]
    a = {"connector": "runs/a/final", "vqa_per_question": [1.0, 0.0, 0.0, 1.0], "vqa_questions_sha": "q",
         "vqa_question_kinds": kinds}
    b = {**a, "connector": "runs/b/final", "vqa_per_question": [1.0, 1.0, 0.0, 0.0]}
    lines = paired_vqa_lines([a, b])
    assert lines[0].startswith("VQA acc, b/final minus a/final: +0.0 points")
    assert any(line.startswith("  order, b/final minus a/final: +33.3 points") for line in lines)
    assert "  av: 1 question, too few to pair" in lines


def test_across_seeds_counts_each_seed_once_with_students_t():
    from mmkit.eval.paired import across_seeds, format_across_seeds, paired_difference

    # seed 0: b wins 3 of 4 examples (+0.75); seed 1: b loses 1 of 8 (-0.125); the examples per seed differ
    s0 = paired_difference([0, 0, 0, 1], [1, 1, 1, 1])
    s1 = paired_difference([1] * 8, [1] * 7 + [0])
    pooled = across_seeds([s0, s1])
    assert pooled["mean_diff"] == pytest.approx((0.75 - 0.125) / 2)  # not the example-weighted 1/6
    assert pooled["seed_stderr"] == pytest.approx(abs(0.75 + 0.125) / 2)  # sd of two values / sqrt(2)
    half = 12.706 * pooled["seed_stderr"]
    assert pooled["ci95"] == pytest.approx([pooled["mean_diff"] - half, pooled["mean_diff"] + half])
    assert not pooled["separated"] and pooled["same_sign"] == 1 and pooled["per_seed"] == [0.75, -0.125]
    assert format_across_seeds("x", pooled).startswith("x: +31.2 points over 2 seeds (seed SE 43.7")
    # the examples-as-one-sample reading weights seeds by their examples and keeps only within-seed noise
    fixed = pooled["examples_pooled"]
    assert fixed["examples"] == 12 and fixed["mean_diff"] == pytest.approx((3 - 1) / 12)  # = the 12 diffs' mean
    assert fixed["stderr"] == pytest.approx(((4 * s0["stderr"]) ** 2 + (8 * s1["stderr"]) ** 2) ** 0.5 / 12)
    assert fixed["ci95"] == pytest.approx([fixed["mean_diff"] - 1.96 * fixed["stderr"],
                                           fixed["mean_diff"] + 1.96 * fixed["stderr"]])
    assert "all 12 examples as one sample, these models only: +16.7, SE " in format_across_seeds("x", pooled)
    same = across_seeds([s0, s0, paired_difference([0, 0, 0, 0], [1, 1, 1, 0])])  # 0.75 three times
    assert not same["separated"] and "no spread between seeds: not informative" in format_across_seeds("x", same)
    three = across_seeds([s0, paired_difference([0] * 4, [1, 1, 0, 0]), paired_difference([0] * 8, [1] * 5 + [0] * 3)])
    assert three["mean_diff"] == pytest.approx(0.625) and three["same_sign"] == 3
    assert three["ci95"][0] == pytest.approx(0.625 - 4.303 * 0.125 / 3 ** 0.5) and three["separated"]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        across_seeds([s0])


def test_seed_pooled_vqa_lines_pair_within_each_seed_and_pool_per_kind():
    from mmkit.eval.vlm import seed_pooled_vqa_lines

    def report(name, scores, sha):
        return {"connector": f"runs/{name}/final", "vqa_per_question": scores, "vqa_questions_sha": sha,
                "vqa_question_kinds": ["order", "order", "av", "av"]}

    seed0 = [report("a0", [0, 0, 1, 1], "q0"), report("b0", [1, 1, 1, 1], "q0")]  # order +100, av 0
    seed1 = [report("a1", [1, 0, 1, 1], "q1"), report("b1", [1, 1, 1, 0], "q1")]  # order +50, av -50
    lines = seed_pooled_vqa_lines([seed0, seed1])
    assert lines[0].startswith("VQA acc, b0/final minus a0/final | b1/final minus a1/final: +25.0 points over 2")
    assert any(line.startswith("  order: +75.0 points over 2 seeds") and "per seed +100.0* +50.0" in line
               for line in lines)
    assert any(line.startswith("  av: -25.0 points over 2 seeds") for line in lines)
    assert seed_pooled_vqa_lines([seed0]) == []
    other_questions = [seed1[0], {**seed1[1], "vqa_questions_sha": "q1-not"}]
    assert "not pooled over seeds" in seed_pooled_vqa_lines([seed0, other_questions])[0]
    with pytest.raises(ValueError, match="same recipes in the same order"):
        seed_pooled_vqa_lines([seed0, seed1[:1]])
    with pytest.raises(ValueError, match=r"the same model is given for two seeds \(runs/a0/final\)"):
        seed_pooled_vqa_lines([seed0, seed0])


def test_giou_averages_per_example_and_ciou_pools_pixels():
    """Hand-made masks: gIoU is the mean of per-example IoUs, cIoU the pooled intersection over the pooled union;
    a "no mask" counts as an empty prediction, an empty truth and prediction as IoU 1."""
    from mmkit.eval.seg import seg_scores

    truth_a = np.zeros((4, 4), bool)
    truth_a[:2, :2] = True  # 4 pixels
    pred_a = np.zeros((4, 4), bool)
    pred_a[:2, :1] = True  # 2 of them: IoU 2/4
    truth_b = np.zeros((4, 4), bool)
    truth_b[:, :] = True  # 16 pixels, predicted "no mask": IoU 0
    empty = np.zeros((4, 4), bool)  # nothing to find, nothing found: IoU 1
    scores = seg_scores([pred_a, None, empty], [truth_a, truth_b, empty], per_example=True)
    assert scores["ious"] == [0.5, 0.0, 1.0]
    assert scores["gIoU"] == pytest.approx(0.5) and scores["cIoU"] == pytest.approx(2 / (4 + 16))
    assert scores["no_mask"] == 1 and scores["examples"] == 3


def test_grounding_asks_whether_the_named_object_is_the_one_segmented():
    import numpy as np

    from mmkit.eval.seg import grounding, named_object_hit

    a, b, c = (np.zeros((6, 6), bool) for _ in range(3))
    a[0:2, 0:2], b[3:6, 3:6], c[0:2, 4:6] = True, True, True
    both = a | b  # covers a (4 px) and b (9 px): b's IoU is higher
    cases = [(a, [a, b], 0), (both, [a, b], 0), (b, [a, b, c], 1), (None, [a, b], 1), (a, [a], 0), (a, None, 0)]
    hits = [named_object_hit(p, m, t) for p, m, t in cases]
    assert hits == [1.0, 0.0, 1.0, 0.0, None, None]  # one-object or unknown scenes do not count; no mask misses
    out = grounding(hits, [2, 2, 3, 2, 1, 0])
    assert out == {"expressions": 4, "named_best": 0.5, "chance": (0.5 + 0.5 + 1 / 3 + 0.5) / 4}
    assert grounding([None], [1]) == {"expressions": 0, "named_best": None, "chance": None}
    assert named_object_hit(np.zeros((6, 6), bool), [a, b], 0) == 0.0  # touching nothing is not picking object 0
