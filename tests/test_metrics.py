"""metrics.py: the figures and the calibration, checked by hand."""
import numpy as np
import pytest

from metrics import (
    age_group_figures,
    apply_calibration,
    calibration_report,
    choose_age_estimate,
    compute_metrics,
    coverage_curve,
    expected_calibration_error,
    fit_calibration,
    fit_unsure_threshold,
    gender_unsure,
    median_age,
    predicted_age,
)


def test_unsure_rule_by_hand():
    # confidences 0.55 (2 right of 4), 0.65 (3 of 4), 0.9 (4 of 4), 0.99 (4 of 4), the gender shown being 1
    conf = np.repeat([0.55, 0.65, 0.9, 0.99], 4)
    gp = np.stack([1 - conf, conf], 1)
    truth = np.array([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    # below 0.56: 2 of 4 right (50%); below 0.66: 5 of 8 (62.5%); below 0.91 to 0.99: 9 of 12 (75%), and
    # of the thresholds that mark the same faces the lowest is kept
    assert fit_unsure_threshold(gp, truth, accuracy=0.75) == 0.91
    assert fit_unsure_threshold(gp, truth, accuracy=0.7) == 0.66
    assert fit_unsure_threshold(gp, truth, accuracy=0.4) == 0.5  # even the least sure are right more often
    assert list(gender_unsure(gp, 0.66)) == [True] * 8 + [False] * 8
    # unknown genders (-1) are left out; weights let a source count more
    assert fit_unsure_threshold(np.vstack([gp, [[0.4, 0.6]]]), np.r_[truth, -1], accuracy=0.75) == 0.91
    w = np.r_[np.full(4, 3.0), np.ones(12)]  # the 0.55 faces (2 of 4 right) weigh 3x: below 0.91, 13 of 20
    assert fit_unsure_threshold(gp, truth, w, accuracy=0.7) == 0.91
    coverage, acc, threshold = coverage_curve(gp, truth, points=16)
    assert [coverage[k] for k in (3, 7, 11, 15)] == [0.25, 0.5, 0.75, 1.0]
    assert [acc[k] for k in (3, 7, 11, 15)] == [1.0, 1.0, 11 / 12, 13 / 16] and threshold[15] == 0.55


def test_paired_difference_by_hand():
    from metrics import paired_difference

    # every face 1 year worse: the difference is exactly 1, whatever faces a resample draws
    same = paired_difference([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])
    assert same["diff"] == 1.0 and same["se"] == pytest.approx(0.0, abs=1e-12) and same["lo"] == same["hi"] == 1.0
    # one face of four 4 years worse: mean +1, and a resample may leave that face out or draw it twice
    one = paired_difference([4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    assert one["diff"] == 1.0 and one["lo"] == 0.0 and one["hi"] >= 2.0 and 0.5 < one["se"] < 3.0 and one["n"] == 4


def test_metrics_epsilon_and_unknown_gender_by_hand():
    age_prob = np.zeros((3, 101))
    age_prob[0, 20] = age_prob[1, 30] = age_prob[2, 44] = 1.0
    gp = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    m = compute_metrics(gp, age_prob, np.array([20, 34, 40]), np.array([0, -1, 1]), age_std_true=np.array([2.0, 4.0, 4.0]))
    assert m["n_gender"] == 2 and m["gender_acc"] == 0.5  # the unknown one is not counted
    assert m["age_mae"] == pytest.approx(8 / 3)
    assert m["age_epsilon"] == pytest.approx((0 + 2 * (1 - np.exp(-16 / 32))) / 3)


def test_calibration_by_hand():
    # predicted distributions: uniform over 11 ages centred on 50 -> std sqrt(10) = 3.162
    age_prob = np.zeros((4, 101))
    age_prob[:, 45:56] = 1 / 11
    std = np.sqrt(10)
    truth = np.array([50, 52, 46, 60])  # |err| 0, 2, 4, 10 -> z 0, 0.632, 1.265, 3.162
    r = calibration_report(np.full((4, 2), 0.5), age_prob, truth, np.full(4, -1))
    assert r["age_within_1std"] == 0.5 and r["age_within_2std"] == 0.75
    assert r["age_z_median"] == pytest.approx((2 / std + 4 / std) / 2)
    fit = fit_calibration(np.full((4, 2), 0.5), age_prob, truth, np.full(4, -1))
    assert fit["age_std_scale"] == pytest.approx(((2 / std + 4 / std) / 2) / 0.6745, abs=1e-3)
    # ECE: confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right): |0.9-0.5|/2 + |0.6-1|/2
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    # an over-confident gender model gets a temperature above 1, which lowers its ECE
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.55, 0.95, 4000)
    labels = (rng.random(4000) < p_true).astype(int)  # truly male with probability p_true
    overconfident = 1 / (1 + np.exp(-3 * np.log(p_true / (1 - p_true))))
    gp = np.stack([1 - overconfident, overconfident], 1)
    fit = fit_calibration(gp, np.tile(age_prob[:1], (4000, 1)), np.full(4000, 50), labels)
    assert fit["gender_temperature"] == pytest.approx(3.0, rel=0.15)
    cal, _ = apply_calibration(gp, np.ones(4000), fit)
    before = calibration_report(gp, np.tile(age_prob[:1], (4000, 1)), np.full(4000, 50), labels)["gender_ece"]
    after = calibration_report(cal, np.tile(age_prob[:1], (4000, 1)), np.full(4000, 50), labels)["gender_ece"]
    assert after < before / 3


def test_calibration_weights_let_a_small_source_count_as_much():
    # 100 faces of source A with |err|/std = 1, 10 faces of source B with |err|/std = 3
    age_prob = np.zeros((110, 101))
    age_prob[:, [40, 60]] = 0.5  # expected age 50, std 10
    truth = np.r_[np.full(100, 60.0), np.full(10, 80.0)]
    plain = fit_calibration(np.full((110, 2), 0.5), age_prob, truth, np.full(110, -1))
    weights = np.r_[np.full(100, 1 / 100), np.full(10, 1 / 10)]
    fair = fit_calibration(np.full((110, 2), 0.5), age_prob, truth, np.full(110, -1), weights=weights)
    assert plain["age_std_scale"] == pytest.approx(1 / 0.6745, abs=1e-3)
    assert fair["age_std_scale"] == pytest.approx(2 / 0.6745, abs=1e-3)  # halfway between the two sources


def test_median_age_by_hand():
    """Class k covers the ages [k - 0.5, k + 0.5): a mass at one age gives that age, and the median moves
    continuously where the mean is pulled by a far tail."""
    p = np.zeros((4, 101))
    p[0, 1] = 1.0  # all at age 1
    p[1, [30, 31]] = 0.5  # half at 30, half at 31: both 30.5
    p[2, [0, 1, 10]] = [0.3, 0.3, 0.4]  # a baby with a tail: mean 4.3, median 0.5 + 0.2 / 0.3 (in class 1)
    p[3, [20, 21, 22]] = [0.25, 0.5, 0.25]
    assert median_age(p) == pytest.approx([1.0, 30.5, 0.5 + 0.2 / 0.3, 21.0])
    assert predicted_age(p, "mean") == pytest.approx([1.0, 30.5, 4.3, 21.0])
    assert predicted_age(p * 3, "median") == pytest.approx(median_age(p))  # unnormalised is normalised first
    with pytest.raises(ValueError, match="unknown age estimate"):
        predicted_age(p, "mode")
    # MAE and coverage follow the estimate asked for
    truth = np.array([1, 30, 1, 21])
    assert compute_metrics(np.full((4, 2), 0.5), p, truth, np.full(4, -1))["age_mae"] == pytest.approx((0.5 + 3.3) / 4)
    assert compute_metrics(np.full((4, 2), 0.5), p, truth, np.full(4, -1), estimate="median")["age_mae"] == pytest.approx((0.5 + (0.5 + 0.2 / 0.3 - 1)) / 4)


def test_choose_age_estimate_by_hand():
    """The estimate with the lower (weighted) validation MAE wins; weights let a small source count as much."""
    babies = np.zeros((3, 101))
    babies[:, [0, 1, 10]] = [0.3, 0.3, 0.4]  # mean 4.3, median 1.167
    adults = np.zeros((3, 101))
    adults[:, [20, 60]] = [0.6, 0.4]  # mean 36, median 19.5 + 0.5 / 0.6 (in class 20)
    assert choose_age_estimate(babies, np.full(3, 1.0))[0] == "median"
    best, mae = choose_age_estimate(adults, np.full(3, 36.0))
    assert best == "mean" and mae["mean"] == pytest.approx(0) and mae["median"] == pytest.approx(36 - (19.5 + 0.5 / 0.6))
    both, truth = np.r_[babies[:1], adults], np.r_[1.0, np.full(3, 36.0)]
    assert choose_age_estimate(both, truth)[0] == "mean"  # three adults outweigh one baby ...
    assert choose_age_estimate(both, truth, weights=[1.0, 0.01, 0.01, 0.01])[0] == "median"  # ... unless weighted


def test_metrics_on_hand_made_predictions():
    age_prob = np.zeros((4, 101))
    age_prob[0, 20] = 1.0                       # true 20: exact
    age_prob[1, [30, 40]] = 0.5                 # true 30: expectation 35, top-1 is 30 (first max)
    age_prob[2, 50] = 0.6
    age_prob[2, [51, 52, 53, 54]] = 0.1         # true 54: expectation 51, in the top 5
    age_prob[3, 10] = 1.0                       # true 70: off by 60
    gender_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    m = compute_metrics(gender_prob, age_prob, np.array([20, 30, 54, 70]), np.array([0, 1, 0, 1]))
    assert m["n"] == 4 and m["gender_acc"] == 0.5
    assert m["age_mae"] == pytest.approx((0 + 5 + 3 + 60) / 4)
    assert m["age_cs5"] == 0.75 and m["age_top1"] == 0.5 and m["age_top5"] == 0.75
    # the age shown is rounded before its group is looked up: 29.6 shows as 30, in the 30s
    g = age_group_figures([29.6, 2.4, 2.6, 75.0], [30, 2, 2, 69])
    assert g["age_group_acc"] == 0.5 and g["age_group_acc_balanced"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert g["age_bias"] == pytest.approx((-0.4 + 0.4 + 0.6 + 6) / 4)


def test_the_std_scale_holds_on_the_hardest_source():
    """Two sources whose errors are 1x and 2x a unit normal's: the scale is the harder one's, under which 68% of
    its true ages lie within ±1 std and at least 93% within ±2; the easier one is then covered more."""
    from metrics import std_scale_for_every_source

    rng = np.random.default_rng(0)
    easy, hard = np.abs(rng.normal(size=20000)), np.abs(rng.normal(size=20000)) * 2
    s = std_scale_for_every_source([easy, hard], within_2std=0.93)
    assert s == pytest.approx(max(np.quantile(hard, 0.68), np.quantile(hard, 0.93) / 2), abs=1e-4)
    assert np.mean(hard / s <= 1) >= 0.679 and np.mean(hard / s <= 2) >= 0.93 and np.mean(easy / s <= 1) > 0.9
    heavy = np.abs(rng.standard_t(2, size=20000))  # heavy tails: ±2 std decides, ±1 is then wider than 68%
    s = std_scale_for_every_source([heavy], within_2std=0.93)
    assert np.mean(heavy / s <= 2) == pytest.approx(0.93, abs=0.002) and np.mean(heavy / s <= 1) > 0.7


def test_the_crossfitted_coverage_never_fits_on_the_person_it_scores():
    """One person with 50 faces read 10x worse than everyone else's: fitted on the other folds only, the ±
    misses nearly all of that person's faces, which a fit that included them would not; by hand, each fold's
    scale comes from the other folds' faces alone."""
    from metrics import crossfit_coverage, std_scale_for_every_source

    rng = np.random.default_rng(1)
    z = np.abs(rng.normal(size=450))
    ids = [f"p{i}" for i in range(400)] + ["outlier"] * 50
    z = np.concatenate([z[:400], 10 + z[400:]])
    sources = np.array(["utk"] * 450)
    got = crossfit_coverage(z, sources, ids, within_2std=0.93, folds=5, seed=0)["utk"]
    import hashlib

    fold = np.array([int.from_bytes(hashlib.sha1(f"0:utk:{i}".encode()).digest()[:4], "big") % 5 for i in ids])
    assert len(set(fold[400:])) == 1  # one person, one fold
    scaled = np.empty_like(z)
    for k in range(5):
        scaled[fold == k] = z[fold == k] / std_scale_for_every_source([z[fold != k]], 0.93)
    assert got == (pytest.approx(np.mean(scaled <= 1)), pytest.approx(np.mean(scaled <= 2)))
    leaky = z / std_scale_for_every_source([z], 0.93)  # fitted with the person's own faces
    assert np.mean(scaled[400:] <= 2) < 0.1 < np.mean(leaky[400:] <= 2)
