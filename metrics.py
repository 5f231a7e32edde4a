"""How good a prediction is: gender and age metrics, the epsilon error, and whether the uncertainty
the model shows (age ± std, gender probability) means what it says.

    from metrics import compute_metrics, calibration_report
    m = compute_metrics(gender_prob, age_prob, ages, genders)           # gender -1 = unknown: age only
    m = compute_metrics(gender_prob, age_prob, ages, genders, age_std)   # + epsilon (ChaLearn LAP)
    c = calibration_report(gender_prob, age_prob, ages, genders)         # coverage of ±1/±2 std, ECE

The age a face is given is one number read off its predicted distribution over 0..100
(`predicted_age`): its mean (DEX's expected age, what training's L1 term fits) or its median, the
number that minimises the expected absolute error when the distribution is right. Every function
here takes `estimate` ("mean" or "median"); `choose_age_estimate` picks one on validation data.
Calibration is fitted on validation data and applied by `apply_calibration`: the age std is multiplied
by one factor (the age shown does not move, so MAE is unchanged), which calibrate.py takes from
`std_scale_for_every_source` (wide enough for the hardest source), and the gender logit is divided by
a temperature (`fit_calibration`).
"""
import numpy as np

import config

NAN = float("nan")


def label_stds(rows):
    """The votes' std of each labelled row (apparent age, CLAP2016) as an array, or None when no row has one."""
    stds = np.array([float(r.get("age_std") or "nan") for r in rows])
    return stds if np.isfinite(stds).any() else None


def age_group(age):
    """The config.AGE_GROUPS group an age falls in, as its label ("20-29", "70+")."""
    lo, hi = next(g for g in config.AGE_GROUPS if g[0] <= age <= g[1])
    return f"{lo}+" if hi >= 200 else f"{lo}-{hi}"


AGE_ESTIMATES = ("mean", "median")


def expected_age(age_prob):
    return np.asarray(age_prob, dtype=np.float64) @ np.arange(np.shape(age_prob)[1])


def median_age(age_prob):
    """The median of each distribution, class k covering the ages [k - 0.5, k + 0.5) with its probability
    spread evenly, so that the median moves continuously (a mass at one age gives that age)."""
    p = np.asarray(age_prob, dtype=np.float64)
    p = p / p.sum(1, keepdims=True)
    cum = np.cumsum(p, 1)
    k = np.minimum((cum < 0.5).sum(1), p.shape[1] - 1)  # the class in which the cumulative mass reaches one half
    rows = np.arange(len(p))
    below = np.where(k > 0, cum[rows, np.maximum(k - 1, 0)], 0.0)
    age = k - 0.5 + (0.5 - below) / np.maximum(p[rows, k], 1e-12)
    return np.clip(age, 0, p.shape[1] - 1)


def check_age_estimate(estimate):
    """`estimate` if it is one of AGE_ESTIMATES, else ValueError saying which there are."""
    if estimate not in AGE_ESTIMATES:
        raise ValueError(f"unknown age estimate '{estimate}' (choose from {', '.join(AGE_ESTIMATES)})")
    return estimate


def predicted_age(age_prob, estimate="mean"):
    """The age given to each face: the mean or the median of its predicted distribution (AGE_ESTIMATES)."""
    return expected_age(age_prob) if check_age_estimate(estimate) == "mean" else median_age(age_prob)


def age_std_of(age_prob):
    p = np.asarray(age_prob, dtype=np.float64)
    ages = np.arange(p.shape[1])
    mean = p @ ages
    return np.sqrt(np.clip(p @ ages**2 - mean**2, 0, None))


def effective_age(pred, age_true, age_span=None):
    """The true age to measure each prediction against: the label's age, or for a label that is an age
    range the point of the range nearest the prediction, so that |pred - effective age| is how far the
    prediction lies outside the range (0 inside it): the error of a source labelled with age groups
    (FairFace), which never pretends a group's middle is the age."""
    if age_span is None:
        return np.asarray(age_true, dtype=np.float64)
    span = np.asarray(age_span, dtype=np.float64)
    ranged = span[:, 0] != span[:, 1]
    return np.where(ranged, np.clip(pred, span[:, 0] - 0.5, span[:, 1] + 0.5), np.asarray(age_true, dtype=np.float64))


def compute_metrics(gender_prob, age_prob, age_true, gender_true, age_std_true=None, estimate="mean", age_span=None):
    """Gender accuracy (over faces whose gender is known, i.e. not -1), age MAE of the predicted age
    (`estimate`: the mean or the median of the distribution), CS@5, exact-age top-1/top-5, and with
    the labels' std (apparent age) the epsilon error mean(1 - exp(-(pred - age)^2 / (2 std^2))).
    With `age_span` (N x 2: the [min, max] each label allows) where some labels are age ranges: the
    errors of those are distances to the range (effective_age), and `age_group_acc` is the share of them
    whose predicted age, rounded, falls inside its range."""
    gender_prob, age_prob = np.asarray(gender_prob, dtype=np.float64), np.asarray(age_prob, dtype=np.float64)
    age_true, gender_true = np.asarray(age_true), np.asarray(gender_true)
    n = len(age_true)
    out = {"n": int(n), "n_gender": 0, "gender_acc": NAN, "age_mae": NAN, "age_cs5": NAN, "age_top1": NAN, "age_top5": NAN}
    if n == 0:
        return out
    pred = predicted_age(age_prob, estimate)
    err = np.abs(pred - effective_age(pred, age_true, age_span))
    ranged = np.zeros(n, bool) if age_span is None else np.asarray(age_span)[:, 0] != np.asarray(age_span)[:, 1]
    if ranged.any():
        out["age_group_acc"] = float(np.mean(err[ranged] == 0))
    top5 = np.argsort(-age_prob, axis=1)[:, :5]
    known = gender_true >= 0
    out.update({
        "n_gender": int(known.sum()),
        "gender_acc": float(np.mean(gender_prob[known].argmax(1) == gender_true[known])) if known.any() else NAN,
        "age_mae": float(err.mean()),
        "age_cs5": float(np.mean(err <= 5)),
        "age_top1": float(np.mean(age_prob.argmax(1) == age_true)),
        "age_top5": float(np.mean((top5 == age_true[:, None]).any(1))),
    })
    if age_std_true is not None:
        std = np.asarray(age_std_true, dtype=np.float64)
        ok = np.isfinite(std) & (std > 0)
        if ok.any():
            out["age_epsilon"] = float(np.mean(1 - np.exp(-((pred[ok] - age_true[ok]) ** 2) / (2 * std[ok] ** 2))))
    return out


def expected_calibration_error(confidence, correct, bins=10):
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins
    (weighted by how many predictions fall in each)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return NAN
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(confidence[m].mean() - correct[m].mean())
    return float(ece)


def calibration_report(gender_prob, age_prob, age_true, gender_true, std_scale=1.0, estimate="mean"):
    """Share of true ages inside ±1 and ±2 predicted std around the predicted age (ideal about 68% / 95% if errors were
    Gaussian), the median |error| / std, and the gender probability's ECE (known genders only)."""
    age_true, gender_true = np.asarray(age_true, dtype=np.float64), np.asarray(gender_true)
    if len(age_true) == 0:
        return {"age_within_1std": NAN, "age_within_2std": NAN, "age_z_median": NAN, "gender_ece": NAN}
    std = np.maximum(age_std_of(age_prob) * std_scale, 1e-6)
    z = np.abs(predicted_age(age_prob, estimate) - age_true) / std
    known = gender_true >= 0
    gp = np.asarray(gender_prob, dtype=np.float64)[known]
    return {
        "age_within_1std": float(np.mean(z <= 1)),
        "age_within_2std": float(np.mean(z <= 2)),
        "age_z_median": float(np.median(z)),
        "gender_ece": expected_calibration_error(gp.max(1), gp.argmax(1) == gender_true[known]) if known.any() else NAN,
    }


def _gender_with_temperature(gender_prob, t):
    p = np.clip(np.asarray(gender_prob, dtype=np.float64)[:, 1], 1e-7, 1 - 1e-7)
    logit = np.log(p / (1 - p)) / t
    p1 = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p1, p1], axis=1)


def weighted_median(values, weights):
    order = np.argsort(values)
    v, w = np.asarray(values, dtype=np.float64)[order], np.asarray(weights, dtype=np.float64)[order]
    cum = np.cumsum(w)
    half = 0.5 * cum[-1]
    k = int(np.searchsorted(cum, half))
    if np.isclose(cum[k], half) and k + 1 < len(v):  # exactly half the weight below: the midpoint, as np.median
        return float((v[k] + v[k + 1]) / 2)
    return float(v[k])


def fit_calibration(gender_prob, age_prob, age_true, gender_true, weights=None, estimate="mean"):
    """{'age_std_scale': s, 'gender_temperature': t} fitted on validation predictions, the age errors
    measured from the `estimate` of each distribution (what the demo will show).

    s makes the (weighted) median of |error| / (s * std) equal 0.674, the median of |z| for a Gaussian,
    so that half the true ages fall within ±0.674 std and, if errors are near Gaussian, 68% within ±1
    std. A median is robust to the few labels that are simply wrong. `weights` (per face) let each data
    source count the same however many faces it has. t minimises the gender negative log-likelihood
    (a grid search over 0.25..4 on a log scale, then refined)."""
    age_true, gender_true = np.asarray(age_true, dtype=np.float64), np.asarray(gender_true)
    std = np.maximum(age_std_of(age_prob), 1e-6)
    z = np.abs(predicted_age(age_prob, estimate) - age_true) / std
    weights = np.ones(len(z)) if weights is None else np.asarray(weights, dtype=np.float64)
    scale = weighted_median(z, weights) / 0.6745 if len(z) else 1.0
    known = gender_true >= 0
    t_best = 1.0
    if known.any():
        gp, g = np.asarray(gender_prob, dtype=np.float64)[known], gender_true[known].astype(int)

        def nll(t):
            return -np.mean(np.log(np.clip(_gender_with_temperature(gp, t)[np.arange(len(g)), g], 1e-12, None)))

        grid = np.exp(np.linspace(np.log(0.25), np.log(4), 41))
        t_best = float(grid[np.argmin([nll(t) for t in grid])])
        fine = t_best * np.exp(np.linspace(-0.04, 0.04, 17))
        t_best = float(fine[np.argmin([nll(t) for t in fine])])
    return {"age_std_scale": round(scale, 4), "gender_temperature": round(t_best, 4)}


def age_z(age_prob, age_true, estimate="mean"):
    """Each face's |error| in units of its predicted std (before any calibration factor)."""
    std = np.maximum(age_std_of(age_prob), 1e-6)
    return np.abs(predicted_age(age_prob, estimate) - np.asarray(age_true, dtype=np.float64)) / std


def std_scale_for_every_source(z_by_source, within_2std=config.STD_WITHIN_2):
    """The factor on the std that makes the ± hold on the hardest source: for each source the smallest factor
    under which 68% of its true ages fall within ±1 std and `within_2std` of them within ±2 std, and of those
    the largest. One source easier than the rest (CLAP2016's holdout is read with a lower error than its own
    val and test) no longer sets a ± too narrow for the others and for new people."""
    scales = [max(np.quantile(z, 0.68), np.quantile(z, within_2std) / 2) for z in z_by_source if len(z)]
    return round(float(max(scales)), 4) if scales else 1.0


def crossfit_coverage(z, sources, identities, within_2std=config.STD_WITHIN_2, folds=5, seed=0):
    """How the ± holds on people it was not fitted on: the faces split into `folds` folds by a seeded hash of
    their identity (a person's faces all in one fold), each fold's ± fitted (std_scale_for_every_source) on
    the other folds only and scored on it. Returns {source: (share within ±1 std, within ±2 std)}."""
    import hashlib

    z, sources = np.asarray(z, dtype=np.float64), np.asarray(sources)
    fold = np.array([int.from_bytes(hashlib.sha1(f"{seed}:{s}:{i}".encode()).digest()[:4], "big") % folds
                     for s, i in zip(sources, identities)])
    scaled = np.empty_like(z)
    for k in range(folds):
        held = fold == k
        rest = ~held
        scale = std_scale_for_every_source([z[rest & (sources == s)] for s in np.unique(sources)], within_2std)
        scaled[held] = z[held] / scale
    return {str(s): (float(np.mean(scaled[sources == s] <= 1)), float(np.mean(scaled[sources == s] <= 2))) for s in np.unique(sources)}


def choose_age_estimate(age_prob, age_true, weights=None):
    """The AGE_ESTIMATES entry with the lower (weighted) MAE on these validation faces, and each one's MAE."""
    weights = np.ones(len(age_true)) if weights is None else np.asarray(weights, dtype=np.float64)
    mae = {e: float(np.average(np.abs(predicted_age(age_prob, e) - np.asarray(age_true)), weights=weights)) for e in AGE_ESTIMATES}
    return min(AGE_ESTIMATES, key=mae.get), mae


def gender_unsure(gender_prob, below):
    """Which faces' gender is shown as unsure: the probability of the gender shown is under `below`."""
    return np.asarray(gender_prob, dtype=np.float64).max(1) < below


def age_group_figures(pred_age, ages):
    """How the ages given fall into config.AGE_GROUPS: the share whose age shown (rounded) is in the true
    age's group (age_group_acc); the same with each group present weighing the same (age_group_acc_balanced:
    a set balanced over ages, where 0-2 counts as much as 20-29); and the
    mean signed error, predicted minus true (age_bias: negative = read too young). NaN where there is no face."""
    pred_age, ages = np.asarray(pred_age, dtype=np.float64), np.asarray(ages)
    if len(ages) == 0:
        return {"age_group_acc": NAN, "age_group_acc_balanced": NAN, "age_bias": NAN}
    true_group = np.array([age_group(int(a)) for a in ages])
    right = np.array([age_group(int(round(p))) for p in pred_age]) == true_group
    by_group = [right[true_group == g].mean() for g in np.unique(true_group)]
    return {"age_group_acc": float(right.mean()), "age_group_acc_balanced": float(np.mean(by_group)),
            "age_bias": float((pred_age - ages).mean())}


def unsure_figures(gender_prob, genders, unsure_below):
    """Share of the faces with a known gender marked unsure, the gender accuracy of those (unsure_acc) and
    of the others (sure_acc); NaN where there is no face to count."""
    known = np.asarray(genders) >= 0
    gp = np.asarray(gender_prob)[known]
    unsure = gender_unsure(gp, unsure_below) if known.any() else np.zeros(0, bool)
    right = gp.argmax(1) == np.asarray(genders)[known] if known.any() else np.zeros(0, bool)
    return {"unsure": float(unsure.mean()) if known.any() else NAN,
            "unsure_acc": float(right[unsure].mean()) if unsure.any() else NAN,
            "sure_acc": float(right[~unsure].mean()) if (~unsure).any() else NAN}


def fit_unsure_threshold(gender_prob, gender_true, weights=None, accuracy=config.GENDER_UNSURE_ACCURACY):
    """The gender probability under which a face is marked unsure, chosen on validation faces: the
    highest threshold (0.50, 0.51, .., 0.99) at which the faces it marks are, all together, right no
    more often than `accuracy` (weighted: each source counting the same), lowered to the lowest one
    that marks the same faces. Below it a shown gender is
    nearer a guess than a fact; above it the faces are left alone. 0.5 (nothing marked) when even the
    least sure faces are right more often than that."""
    gender_true = np.asarray(gender_true)
    known = gender_true >= 0
    gp = np.asarray(gender_prob, dtype=np.float64)[known]
    w = (np.ones(len(gender_true)) if weights is None else np.asarray(weights, dtype=np.float64))[known]
    conf, right = gp.max(1), gp.argmax(1) == gender_true[known]
    grid = np.round(np.arange(0.5, 1.0, 0.01), 2)
    best = 0.5
    for t in grid:
        m = conf < t
        if m.any() and np.average(right[m], weights=w[m]) <= accuracy:
            best = float(t)
    # of the thresholds that mark the same validation faces, the lowest: no face marked for want of data
    marked = (conf < best).sum()
    return float(next(t for t in grid if (conf < t).sum() == marked))


def coverage_curve(gender_prob, gender_true, points=50):
    """Gender accuracy of the faces kept against the share kept (coverage), the least sure dropped first:
    (coverage, accuracy, threshold) arrays, for a plot of what marking faces unsure buys."""
    gender_true = np.asarray(gender_true)
    known = gender_true >= 0
    gp = np.asarray(gender_prob, dtype=np.float64)[known]
    conf, right = gp.max(1), (gp.argmax(1) == gender_true[known]).astype(np.float64)
    order = np.argsort(-conf)
    conf, right = conf[order], right[order]
    kept = np.unique(np.linspace(1, len(conf), points).astype(int)) if len(conf) else np.zeros(0, int)
    acc = np.cumsum(right)[kept - 1] / kept
    return kept / max(1, len(conf)), acc, conf[kept - 1]


def apply_calibration(gender_prob, age_std, calibration):
    """Calibrated (gender_prob, age_std); the predicted age is left as it is."""
    if not calibration:
        return gender_prob, age_std
    gp = _gender_with_temperature(gender_prob, calibration.get("gender_temperature", 1.0))
    return gp.astype(np.asarray(gender_prob).dtype), np.asarray(age_std) * calibration.get("age_std_scale", 1.0)


def paired_difference(values_a, values_b, resamples=2000, seed=0):
    """How much two models differ on the same faces: the mean of values_a - values_b (per face, e.g. each
    one's absolute age error), and a paired bootstrap's standard error and 95% interval of that mean
    (faces drawn with replacement, the same faces for both). A small validation split decides nothing
    where the interval straddles 0."""
    d = np.asarray(values_a, dtype=np.float64) - np.asarray(values_b, dtype=np.float64)
    if len(d) == 0:
        return {"diff": NAN, "se": NAN, "lo": NAN, "hi": NAN, "n": 0}
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(resamples)])
    return {"diff": float(d.mean()), "se": float(means.std()), "lo": float(np.percentile(means, 2.5)),
            "hi": float(np.percentile(means, 97.5)), "n": int(len(d))}
