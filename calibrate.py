"""Fit how the model's output is shown to what it gets right, on validation faces, and store it in the checkpoint.

    python calibrate.py --checkpoint checkpoints/mix/best.pt --cache data/utkface data/clap2016
    python calibrate.py --checkpoint weights/age_gender_sface_112x96.pt --cache data/utkface --dry-run

demo.py shows each face's age as `31 ±4`, the ± being the std of the predicted age distribution, and
a gender probability. Trained with soft age labels, that std is a property of the loss, not of the
error: uncalibrated, it can be far too narrow or too wide. This script predicts every `val` face of
the caches (never `test`), chooses how an age is read off its predicted distribution (`age_estimate`:
its mean or its median, whichever has the lower MAE there; metrics.choose_age_estimate), fits a factor on
the age std wide enough for the hardest source (metrics.std_scale_for_every_source: on every cache, 68% of
true ages within ±1 std and --within-2std of them within ±2; a two-age model gets one factor per age, each
fitted on the caches that label it: real ages for `age`, apparent ones for `apparent_age`) and reports how
it holds cross-fitted over identity-disjoint folds, fits a temperature on the gender logit by likelihood
(metrics.fit_calibration), and chooses the gender probability under
which a face is shown as unsure (metrics.fit_unsure_threshold: the highest at which the faces it marks
are, together, right at most --unsure-accuracy of the time), prints the coverage, the gender ECE and the
share marked unsure before and after, per cache (each cache weighing the same in the choice and the
fit), and writes them into the checkpoint as `age_estimate` and `calibration` (atomically, in place
unless --out), with the
test-time views they were fitted for (`tta`, `tta_zoom`) and the gender's second look (`--second-look`:
the probability under which a face's gender also reads its mirror image). demo.py and evaluate.py apply
them and use those views unless told otherwise.
"""
import argparse
import sys

import numpy as np
import torch

import config
from data_gen import CacheError, FaceCache, make_loader
from metrics import (AGE_ESTIMATES, age_z, apply_calibration, calibration_report, choose_age_estimate, crossfit_coverage, effective_age,
                     fit_calibration, fit_unsure_threshold, predicted_age, std_scale_for_every_source, unsure_figures)
from models import CheckpointError
from predictor import AgeGenderPredictor, predict_batches
from utils import add_second_look_option, add_view_options, atomic_torch_save, fail


def predictions(predictor, cache, split, batch_size):
    """(name, gender probs, age probs, true ages, genders, the calibration factor of the output read, whether
    its labels are age ranges) of a cache's split. The age probs are those of the output the cache's labels
    describe (predictor.age_output: a two-age model's apparent age for apparent labels), and a label that is
    an age range (FairFace) counts as the point of the range nearest the predicted age."""
    ds = FaceCache(cache, split=split)
    output, scale_key = predictor.age_output(ds.age_kind)
    gp, ap = predict_batches(predictor.predict_tensor, make_loader(ds, batch_size, workers=0)[0], output)
    ages = effective_age(predicted_age(ap, predictor.age_estimate), ds.ages.numpy(), ds.spans.numpy())
    ranged = bool((ds.spans[:, 0] != ds.spans[:, 1]).any())
    identities = [ds.meta[i].get("identity") or ds.meta[i]["file"] for i in ds.indices]
    return ds.name, gp, ap, ages, ds.genders.numpy(), scale_key, ranged, identities


def show(name, gp, ap, ages, genders, scale_key, ranged, identities, calibration, estimate):
    scale = calibration.get(scale_key, 1.0) if calibration else 1.0
    kind = "apparent" if scale_key.startswith("apparent") else "real"
    if calibration:
        gp, _ = apply_calibration(gp, np.zeros(len(gp)), calibration)
    r = calibration_report(gp, ap, ages, genders, std_scale=scale, estimate=estimate)
    line = (f"  {name:<14} {kind:<8} {len(ages):>6}   within ±1 std {100 * r['age_within_1std']:5.1f}%   ±2 std {100 * r['age_within_2std']:5.1f}%"
            f"   gender ECE {100 * r['gender_ece']:.2f}%")
    if calibration and "gender_unsure_below" in calibration and (genders >= 0).any():
        u = unsure_figures(gp, genders, calibration["gender_unsure_below"])
        line += (f"   unsure {100 * u['unsure']:.1f}% (right {100 * u['unsure_acc']:.0f}%),"
                 f" the rest right {100 * u['sure_acc']:.2f}%")
    print(line)


def report_crossfit(sets, key, estimate, within_2std):
    """The ± on people it was not fitted on: cross-fitted over identity-disjoint folds (metrics.crossfit_coverage)."""
    z = np.concatenate([age_z(s[2], s[3], estimate) for s in sets])
    names = np.concatenate([[s[0]] * len(s[3]) for s in sets])
    coverage = crossfit_coverage(z, names, [i for s in sets for i in s[7]], within_2std)
    print(f"{key}: fitted on folds of other people, scored on the rest: "
          + ", ".join(f"{name} ±1 std {100 * c1:.1f}% ±2 std {100 * c2:.1f}%" for name, (c1, c2) in coverage.items()))


def per_cache_weights(sets):
    """A weight per face so that each cache weighs the same, however many faces it has (as train.py chooses)."""
    return np.concatenate([np.full(len(s[3]), 1.0 / len(s[3])) for s in sets])


def fit_unsure_only(args):
    """--unsure-only: the checkpoint's own calibration and views stay; only gender_unsure_below is fitted."""
    try:
        predictor = AgeGenderPredictor(args.checkpoint)
        sets = [predictions(predictor, c, args.split, args.batch_size) for c in args.cache]
    except (CheckpointError, CacheError, ValueError) as e:
        fail(str(e))
    if not predictor.calibration:
        fail(f"{args.checkpoint} has no calibration to keep: run calibrate.py without --unsure-only")
    gp, genders = np.concatenate([s[1] for s in sets]), np.concatenate([s[4] for s in sets])
    weights = per_cache_weights(sets)
    calibration = {**predictor.calibration, "gender_unsure_below": fit_unsure_threshold(gp, genders, weights, args.unsure_accuracy)}
    print(f"kept: {predictor.calibration}; fitted on {len(genders):,} {args.split} faces: gender_unsure_below {calibration['gender_unsure_below']}")
    shown = {k: calibration[k] for k in ("age_std_scale", "apparent_age_std_scale", "gender_unsure_below") if k in calibration}
    for s in sets:  # the gender probabilities come calibrated already: no temperature again
        show(*s, shown, predictor.age_estimate)
    if args.dry_run:
        return 0
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    ckpt["calibration"] = {**calibration, "unsure_fitted_on": [f"{s[0]} {args.split} ({len(s[3])})" for s in sets]}
    target = args.out or args.checkpoint
    atomic_torch_save(ckpt, target)
    print(f"wrote the unsure threshold into {target}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint to calibrate (written in place unless --out)")
    p.add_argument("--cache", nargs="+", required=True, help="caches whose validation faces are pooled for the fit")
    p.add_argument("--split", default="val", choices=("val",), help="the split fitted on: validation only, never test")
    p.add_argument("--out", default="", help="write the calibrated checkpoint here instead of in place")
    p.add_argument("--batch-size", type=int, default=256, help="faces per forward pass")
    p.add_argument("--age-estimate", default="auto", choices=("auto",) + AGE_ESTIMATES,
                   help="how ages are read off the distribution: auto = the mean or the median, whichever has the lower MAE on these val faces")
    p.add_argument("--unsure-accuracy", type=float, default=config.GENDER_UNSURE_ACCURACY,
                   help="faces are shown as gender-unsure under the highest probability at which those marked are, together, right at most this often")
    p.add_argument("--within-2std", type=float, default=config.STD_WITHIN_2,
                   help="each age's ± is widened until this share of true ages lies within ±2 std (and 68%% within ±1) on "
                        "every validation source that labels that age")
    p.add_argument("--unsure-only", action="store_true",
                   help="keep the checkpoint's calibration, age estimate and views; fit only the gender-unsure threshold (on its own calibrated probabilities)")
    p.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    add_view_options(p, note="; the fit is stored with its views, which become the checkpoint's default")
    add_second_look_option(p, note="; stored with the fit")
    args = p.parse_args(argv)
    if args.unsure_only:
        return fit_unsure_only(args)
    try:
        predictor = AgeGenderPredictor(args.checkpoint, tta=args.tta, calibrated=False,
                                       tta_zoom=args.tta_zoom, second_look=args.second_look)
        sets = [predictions(predictor, c, args.split, args.batch_size) for c in args.cache]
    except (CheckpointError, CacheError, ValueError) as e:
        fail(str(e))
    pooled = [np.concatenate([s[k] for s in sets]) for k in range(1, 5)]
    # each cache weighs the same, as in train.py's choice of epoch: the small in-the-wild set counts as much
    weights = per_cache_weights(sets)
    estimate, mae = choose_age_estimate(pooled[1], pooled[2], weights)
    estimate = estimate if args.age_estimate == "auto" else args.age_estimate
    print("age MAE, each cache weighing the same: " + ", ".join(f"{e} {v:.4f}" for e, v in mae.items()) + f"; ages shown as the {estimate}")
    calibration = fit_calibration(*pooled, weights=weights, estimate=estimate)
    # each output's ± is fitted on the sources it reads (a one-age model's: all of them), wide enough for the
    # hardest of them; an age range says little of the spread (an age inside it is no error at all), so
    # ranged sources count only where they are all there is
    for key in ("age_std_scale", "apparent_age_std_scale"):
        of_kind = [s for s in sets if s[5] == key]
        of_kind = [s for s in of_kind if not s[6]] or of_kind
        if of_kind:
            calibration[key] = std_scale_for_every_source([age_z(s[2], s[3], estimate) for s in of_kind], args.within_2std)
            report_crossfit(of_kind, key, estimate, args.within_2std)
    calibrated_gp, _ = apply_calibration(pooled[0], np.zeros(len(pooled[0])), calibration)
    calibration["gender_unsure_below"] = fit_unsure_threshold(calibrated_gp, pooled[3], weights, args.unsure_accuracy)
    print("before (the model's own std and probability):")
    for s in sets:
        show(*s, None, estimate)
    print(f"fitted on {len(pooled[2]):,} {args.split} faces, each cache weighing the same: {calibration}")
    print("after:")
    for s in sets:
        show(*s, calibration, estimate)
    if args.dry_run:
        return 0
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    ckpt["calibration"] = {**calibration, "fitted_on": [f"{s[0]} {args.split} ({len(s[3])})" for s in sets]}
    ckpt["age_estimate"] = estimate
    # the fit holds for these views only, so they become the checkpoint's default in demo.py and evaluate.py
    ckpt["tta"], ckpt["tta_zoom"] = predictor.tta, float(predictor.net.zoom_factor)
    ckpt["gender_second_look_below"] = predictor.second_look
    target = args.out or args.checkpoint
    atomic_torch_save(ckpt, target)
    print(f"wrote the calibration into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
