"""Measure a checkpoint: gender accuracy, age MAE, CS@5, exact-age top-1/top-5, and where it errs.

    python evaluate.py --cache data/utkface --split test                       # cached aligned crops
    python evaluate.py --labels ../shared/data/utkface/labels.csv --root ../shared/data/utkface \\
        --split test --detect --pad-fraction 0.25 --json out/eval.json --plots out/eval   # raw photos
    python evaluate.py --labels ../shared/data/clap2016/labels.csv --root ../shared/data/clap2016 --split val \\
        --detect --gender-labels labels/clap2016_gender.csv                        # in-the-wild photos, with gender
    python evaluate.py --labels crops.csv --root crops/                        # aligned 112x96 crops
    python evaluate.py --labels ../shared/data/utkface/labels.csv --root ../shared/data/utkface \\
        --split test --detect --pad-fraction 0.25 --downscale 0.25                  # faces ~30 px tall
    python evaluate.py --cache data/aaf --split val --conditions hard              # the hard-conditions validation
    python evaluate.py --cache data/aaf --split val --conditions neighbour         # another face cheek to cheek
    python evaluate.py --cache data/utkface --split val --conditions sharp         # every face sharper (or: soft)
    python evaluate.py --checkpoint new.pt --versus weights/age_gender_sface_112x96.pt --cache data/clap2016 --split val

--checkpoint defaults to the released model. With --detect every photo goes through the demo's
pipeline (detect, align, predict) and photos where no face is found are counted in faces_found;
metrics are over the faces found. The report breaks the errors down by age group, gender and, where
the CSV has a race column (UTKFace: 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others), by race, with the
share of faces whose gender is shown as unsure (`unsure`) and the accuracy on the others (`sure_acc`).
--conditions hard evaluates the hard-conditions set made from a cache's faces (conditions.py: faces
turned away as they are, every other face made small, compressed, blurred, grey, dark, bright or
partly hidden, one condition each, from a fixed seed) and breaks it down by condition too; --conditions
neighbour puts another face of the split beside each face, cheek to cheek, as in group photos; --conditions
sharp and soft make every face sharper or softer, to see whether the age follows how crisp the photo is.
--plots draws MAE by age, predicted against true age, and gender accuracy against coverage. --versus B
predicts the same cached faces with checkpoint B too and reports the paired differences (this one minus B)
with a bootstrap's standard error and 95% interval.
"""
import json
import os
import sys

import cv2
import numpy as np
from tqdm import tqdm

import config
from conditions import SHARPNESS, TURNED, hard_conditions, neighbour_conditions, sharpness_conditions, turn_of
from data_gen import CacheError, FaceCache, make_loader
from models import CheckpointError, normalize
from metrics import (AGE_ESTIMATES, age_group, age_group_figures, calibration_report, compute_metrics, coverage_curve, effective_age,
                     label_stds, paired_difference, predicted_age, unsure_figures)
from detector import align_face
from predictor import predict_batches
from sources import labels_age_kind, read_labels
from utils import InputError, fail, parse_config, read_image, use_all_cores_for_cv2

RACES = {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Others"}


def breakdown(gender_prob, age_prob, ages, genders, groups, estimate="mean", unsure_below=0.0, spans=None):
    """Metrics per group label; groups maps a name to a list of per-face labels. spans: each label's
    [min, max] (compute_metrics' age_span), for sources labelled with age ranges."""
    out = {}
    for name, labels in groups.items():
        labels = np.asarray(labels)
        out[name] = {}
        order = [age_group(lo) for lo, _ in config.AGE_GROUPS] if name == "age_group" else sorted(set(labels.tolist()), key=lambda v: (len(str(v)), str(v)))
        for g in order:
            m = labels == g
            if not m.any():
                continue
            r = compute_metrics(gender_prob[m], age_prob[m], ages[m], genders[m], estimate=estimate,
                                age_span=None if spans is None else spans[m])
            r.update(unsure_figures(gender_prob[m], genders[m], unsure_below))
            r.update(age_group_figures(predicted_age(age_prob[m], estimate), ages[m]))
            out[name][str(g)] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
    return out


def plot(pred_age, ages, folder, gender_prob=None, genders=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    err = np.abs(pred_age - ages)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bins = np.arange(0, 101, 5)
    idx = np.digitize(ages, bins) - 1
    mae = [err[idx == i].mean() if (idx == i).any() else np.nan for i in range(len(bins))]
    cnt = [(idx == i).sum() for i in range(len(bins))]
    ax.bar(bins + 2.5, mae, width=4.5)
    for b, m, c in zip(bins, mae, cnt):
        if c:
            ax.text(b + 2.5, m, str(c), ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("true age (5-year bins; number of faces on top)")
    ax.set_ylabel("MAE (years)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "mae_by_age.png"), dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(ages, pred_age, s=3, alpha=0.3)
    ax.plot([0, 100], [0, 100], "k--", lw=0.8)
    ax.set_xlabel("true age")
    ax.set_ylabel("predicted age")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "pred_vs_true.png"), dpi=90)
    plt.close(fig)
    if gender_prob is not None and (np.asarray(genders) >= 0).any():
        coverage, acc, threshold = coverage_curve(gender_prob, genders)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(100 * coverage, 100 * acc)
        ax.set_xlabel("faces shown with a gender (%), the least sure left out first")
        ax.set_ylabel("gender accuracy on them (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "gender_coverage.png"), dpi=90)
        plt.close(fig)


def plot_gender_by_group(cells, path, title=""):
    """Gender accuracy of women and men of each group side by side, each bar marked with the share whose
    gender is shown as unsure: the README's and the model card's chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k.rsplit(" ", 1)[0] for k in cells if not k.endswith("unknown")})
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.6))
    for k, (sex, colour) in enumerate((("F", "#d0406a"), ("M", "#3b78c2"))):
        rows = [cells.get(f"{name} {sex}") for name in names]
        x = np.arange(len(names)) + (k - 0.5) * 0.38
        acc = [100 * r["gender_acc"] if r else np.nan for r in rows]
        ax.bar(x, acc, 0.36, color=colour, label={"F": "women", "M": "men"}[sex])
        for xi, a, r in zip(x, acc, rows):
            if r:
                ax.text(xi, a + 0.4, f"{a:.0f}%\n?{100 * r['unsure']:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)), [f"{n}\n({sum(cells[f'{n} {s}']['n'] for s in 'FM' if f'{n} {s}' in cells)})" for n in names], fontsize=8)
    low = min(100 * r["gender_acc"] for r in cells.values())
    ax.set_ylim(max(0, low - 10), 104)
    ax.set_ylabel("gender right (%)")
    ax.set_title(f"gender by group and sex{': ' + title if title else ''} (?: shown unsure)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def gaps(table, min_faces=20):
    """The best and worst group's gender and age-group accuracy, and the gap between them, over the groups
    of at least `min_faces` faces with a known label (a group of three faces says nothing)."""
    out = {}
    for key in ("gender_acc", "age_group_acc"):
        values = {g: r[key] for g, r in table.items()
                  if r["n"] >= min_faces and g not in ("unknown", "-1") and r.get(key) is not None and r[key] == r[key]}
        if len(values) > 1:
            best, worst = max(values, key=values.get), min(values, key=values.get)
            out[key] = {"best": best, "worst": worst, "gap": round(values[best] - values[worst], 4)}
    return out


def versus_report(other_path, this, other, ages, genders):
    """This checkpoint's (gender_prob, age) against another's on the same faces: the paired differences of
    the age error (all faces) and of gender right or wrong (faces of known gender), this minus other."""
    known = genders >= 0
    right = [(g.argmax(1) == genders)[known].astype(float) for g, _ in (this, other)]
    return {"checkpoint": other_path,
            "age_mae": paired_difference(np.abs(this[1] - ages), np.abs(other[1] - ages)),
            "gender_acc": paired_difference(*right)}


def versus_text(v):
    age, gender = v["age_mae"], v["gender_acc"]
    text = (f"versus {v['checkpoint']}: age MAE {age['diff']:+.3f} (bootstrap SE {age['se']:.3f}, 95% "
            f"{age['lo']:+.3f} to {age['hi']:+.3f})")
    if gender["n"]:
        text += (f", gender accuracy {100 * gender['diff']:+.2f} points (SE {100 * gender['se']:.2f}, 95% "
                 f"{100 * gender['lo']:+.2f} to {100 * gender['hi']:+.2f})")
    return text + "; this checkpoint minus that one, on the same faces"


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and obj != obj else obj


def build_report(cfg, predictor, other, faces):
    """Every figure evaluate.py reports (printed and in --json), from the predictions on the faces."""
    (gp, ap), *others = faces["predictions"]
    ages, genders, spans, kept, age_kind, turn = (faces[k] for k in ("ages", "genders", "spans", "rows", "age_kind", "turn"))
    races = [r.get("race", "") for r in kept]
    estimate = predictor.age_estimate
    pred_age = predicted_age(ap, estimate)
    metrics = compute_metrics(gp, ap, ages, genders, label_stds(kept), estimate=estimate, age_span=spans)
    # the shown ±std is the model's std times the checkpoint's calibration factor (if any and --calibrated)
    output, scale_key = predictor.age_output(age_kind)
    scale = predictor.calibration.get(scale_key, 1.0) if predictor.calibration else 1.0
    calib = calibration_report(gp, ap, effective_age(pred_age, ages, spans), genders, std_scale=scale, estimate=estimate)
    views = predictor.views
    report = {"checkpoint": cfg.checkpoint, "views": views, "gender_second_look_below": predictor.gender_second_look, "detector": cfg.detector if cfg.detect else None, "downscale": cfg.downscale,
              "age_kind": age_kind, "age_output": output, "age_estimate": estimate, "n": faces["n"], "faces_found": len(kept),
              "calibration_applied": predictor.calibration or None,
              **{k: round(v, 4) for k, v in metrics.items() if k != "n"}, **{k: round(v, 4) for k, v in calib.items()}}
    report.update({k: round(v, 4) for k, v in unsure_figures(gp, genders, predictor.unsure_below).items()})
    report.update({k: round(v, 4) for k, v in age_group_figures(pred_age, ages).items() if k not in metrics})
    report["unsure_below"] = predictor.unsure_below
    report["conditions"] = cfg.conditions or None
    groups = {"age_group": [age_group(a) for a in ages],
              "gender": [{0: "F", 1: "M"}.get(int(g), "unknown") for g in genders]}
    if any(races):
        groups["race"] = [RACES.get(str(r), str(r) or "unknown") for r in races]
        # the errors follow group and sex together (women of one group, men of another): each cell on its own
        groups["race_sex"] = [f"{race} {sex}" for race, sex in zip(groups["race"], groups["gender"])]
        # children's gender is where every group is weakest: each group's under-20s and adults apart
        groups["race_age"] = [f"{race} {'under 20' if a < 20 else '20+'}" for race, a in zip(groups["race"], ages)]
    if turn is not None:  # from 0.3 eye distances of nose offset, a face counts as turned away
        groups["pose"] = ["turned" if t >= TURNED else "frontal" for t in turn]
    if cfg.conditions:
        groups["condition"] = list(faces["condition"])
    report["by"] = breakdown(gp, ap, ages, genders, groups, estimate, predictor.unsure_below, spans)
    report["gaps"] = {name: gaps(report["by"][name]) for name in ("race", "age_group") if name in report["by"]}
    if other is not None:
        other_gp, other_ap = others[0]
        report["versus"] = versus_report(cfg.versus, (gp, pred_age), (other_gp, predicted_age(other_ap, other.age_estimate)), ages, genders)
    return report, metrics


def print_report(report, metrics, predictor):
    """The report in words and tables: the overall figures, then the gaps between groups, then each group."""
    calib, views, estimate = report, report["views"], report["age_estimate"]
    gender_text = f"gender accuracy {100 * metrics['gender_acc']:.2f}%" if metrics["n_gender"] else "gender not labelled"
    print(f"{report['age_kind']} ages, scored on the model's `{report['age_output']}` output"
          + ("; the labels are age ranges: an age inside its range counts as right, the MAE is the distance to the range"
             if "age_group_acc" in metrics else ""))
    print(f"faces {report['faces_found']} of {report['n']}   {gender_text}   age MAE {metrics['age_mae']:.3f}   "
          f"CS@5 {100 * metrics['age_cs5']:.1f}%   exact age top-1 {100 * metrics['age_top1']:.1f}%   top-5 {100 * metrics['age_top5']:.1f}%"
          + (f"   epsilon {metrics['age_epsilon']:.4f}" if "age_epsilon" in metrics else "") + f"   ({views} view{'s' * (views > 1)} per face{second_look_note(report)}, age = the distribution's {estimate})")
    print(f"calibration: true age within ±1 std {100 * calib['age_within_1std']:.1f}% (ideal ~68%), ±2 std "
          f"{100 * calib['age_within_2std']:.1f}% (~95%); gender ECE {100 * calib['gender_ece']:.2f}%"
          + (f"   (applied: {predictor.calibration})" if predictor.calibration else "   (uncalibrated)"))
    if metrics["n_gender"]:
        print(f"gender unsure (probability under {predictor.unsure_below:.2f}): {100 * report['unsure']:.1f}% of the faces; "
              f"the others right {100 * report['sure_acc']:.2f}%")
    print(f"age group right {100 * report['age_group_acc']:.1f}% (each age group weighing the same: "
          f"{100 * report['age_group_acc_balanced']:.1f}%); mean error {report['age_bias']:+.2f} years (predicted - true)")
    if "versus" in report:
        print(versus_text(report["versus"]))
    for name, table in report["gaps"].items():
        for key, g in table.items():
            print(f"by {name}, {key.replace('_acc', ' accuracy').replace('_', ' ')}: best {g['best']} "
                  f"{100 * report['by'][name][g['best']][key]:.2f}%, worst {g['worst']} "
                  f"{100 * report['by'][name][g['worst']][key]:.2f}%, gap {100 * g['gap']:.2f} points")
    for name, table in report["by"].items():
        print(f"\nby {name}:  {'n':>6} {'gender%':>8} {'MAE':>6} {'CS@5%':>6} {'unsure%':>8} {'sure%':>7} {'group%':>7} {'bias':>6}")
        for g, r in table.items():
            print(f"  {g:<12} {r['n']:>6} {100 * r['gender_acc']:>8.2f} {r['age_mae']:>6.2f} {100 * r['age_cs5']:>6.1f}"
                  f" {100 * r['unsure']:>8.1f} {100 * r['sure_acc']:>7.2f} {100 * r['age_group_acc']:>7.1f} {r['age_bias']:>+6.2f}")


def second_look_note(report):
    """How the report's gender was read, when some faces got a second look."""
    below = report.get("gender_second_look_below", 0.0)
    return f", gender with its mirror image under p {below:g}" if below else ""


def load_predictors(cfg):
    """The checkpoint's predictor, and --versus's (or None)."""
    from predictor import AgeGenderPredictor

    device = cfg.device or None  # the predictor's default: CUDA when present, else the CPU
    common = dict(calibrated=cfg.calibrated, detector=cfg.detector, tta_zoom=cfg.tta_zoom, age_estimate=cfg.age_estimate,
                  second_look=cfg.second_look)
    try:
        predictor = AgeGenderPredictor(cfg.checkpoint, device, cfg.tta, **common)
        other = AgeGenderPredictor(cfg.versus, device, cfg.tta, **common) if cfg.versus else None
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    return predictor, other


def predict_cache(cfg, predictors):
    """Each predictor's (gender probs, age probs) on a cache's faces, or on the hard-conditions or
    neighbour set made of them, and what is known of the faces."""
    try:
        ds = FaceCache(cfg.cache, split=cfg.split or None)
    except CacheError as e:
        fail(str(e))
    age_kind = cfg.age_kind or ds.age_kind
    condition = None
    if cfg.conditions:
        raw = ds.read(np.arange(len(ds)))[0]
        try:
            if cfg.conditions in SHARPNESS:
                raw, condition = sharpness_conditions(raw, cfg.conditions)
            else:
                raw, condition = hard_conditions(raw, ds.turn) if cfg.conditions == "hard" else neighbour_conditions(raw)
        except ValueError as e:  # a split of one face: nobody to stand beside it
            fail(f"{cfg.cache}: --conditions {cfg.conditions}: {e}")

        def batches():
            return (normalize(raw[s : s + cfg.batch_size]) for s in range(0, len(raw), cfg.batch_size))
    else:
        def batches():
            return make_loader(ds, cfg.batch_size, workers=0)[0]
    total = -(-len(ds) // cfg.batch_size)
    predictions = [predict_batches(p.predict_tensor, tqdm(batches(), desc="evaluate", unit="batch", total=total), p.age_output(age_kind)[0])
                   for p in predictors]
    return dict(predictions=predictions, ages=ds.ages.numpy(), genders=ds.genders.numpy(), spans=ds.spans.numpy(), rows=ds.rows(),
                n=len(ds), age_kind=age_kind, turn=ds.turn if ds.has_landmarks else None, condition=condition)


def read_crops(cfg, predictor, rows):
    """The aligned crop of each labelled photo (with --detect: its most confident face, and how far it is
    turned) and the rows that have one; an unreadable photo is reported and skipped."""
    crops, keep, turns, unreadable = [], [], [], 0
    for r in tqdm(rows, desc="detect+align" if cfg.detect else "read", unit="img"):
        path = os.path.join(cfg.root, r["file"])
        try:
            rgb = read_image(path)
        except InputError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            unreadable += 1
            continue
        if cfg.detect:
            if cfg.downscale != 1.0:
                rgb = cv2.resize(rgb, None, fx=cfg.downscale, fy=cfg.downscale, interpolation=cv2.INTER_AREA)
            faces = predictor.detector.detect(rgb, pad_fraction=cfg.pad_fraction)
            if not faces:
                continue
            crop = align_face(rgb, faces[0].landmarks)  # the most confident face is the labelled one
            turns.append(turn_of(faces[0].landmarks[None])[0])
        elif rgb.shape[:2] != (config.IMAGE_H, config.IMAGE_W):
            crop = cv2.resize(rgb, (config.IMAGE_W, config.IMAGE_H), interpolation=cv2.INTER_AREA)
        else:
            crop = rgb
        crops.append(crop)
        keep.append(r)
    if unreadable:
        print(f"{unreadable} of {len(rows)} images could not be read", file=sys.stderr)
    return crops, keep, np.array(turns) if cfg.detect else None


def predict_labelled_photos(cfg, predictor):
    """The predictor's (gender probs, age probs) on the photos of a labels CSV, and what is known of the faces."""
    try:
        rows = read_labels(cfg.labels, cfg.split, cfg.gender_labels)
    except InputError as e:
        fail(str(e))
    if not rows:
        fail(f"{cfg.labels}: no rows" + (f" in split '{cfg.split}'" if cfg.split else ""))
    age_kind = cfg.age_kind or labels_age_kind(rows)
    crops, keep, turn = read_crops(cfg, predictor, rows)
    batches = (normalize(np.stack(crops[s : s + cfg.batch_size])) for s in range(0, len(crops), cfg.batch_size))
    gp, ap = predict_batches(predictor.predict_tensor, batches, predictor.age_output(age_kind)[0]) if crops else (None, None)
    return dict(predictions=[(gp, ap)], ages=np.array([r["age"] for r in keep]), genders=np.array([r["gender"] for r in keep]),
                spans=np.array([[r["age_min"], r["age_max"]] for r in keep]).reshape(-1, 2), rows=keep, n=len(rows),
                age_kind=age_kind, turn=turn, condition=None)


def check_options(cfg):
    if not 0 < cfg.downscale <= 1:
        fail(f"--downscale {cfg.downscale}: give a factor in (0, 1]")
    if cfg.downscale != 1.0 and not cfg.detect:
        fail("--downscale applies to raw photos: add --detect")
    if cfg.conditions and not cfg.cache:
        fail(f"--conditions {cfg.conditions} is made from a cache's faces: add --cache")
    if cfg.versus and not cfg.cache:
        fail("--versus compares two checkpoints on a cache's faces: add --cache")
    if not (cfg.cache or cfg.labels):
        fail("give --cache DIR or --labels CSV")


def main(argv=None):
    from detector import DETECTORS

    cfg = parse_config(config.EvalConfig, argv, description="Evaluate an AgeGenderNet checkpoint",
                       choices={"detector": sorted(DETECTORS), "age_estimate": AGE_ESTIMATES, "conditions": ("", "hard", "neighbour", *SHARPNESS),
                                "age_kind": ("", "real", "apparent")})
    check_options(cfg)
    predictor, other = load_predictors(cfg)
    if cfg.cache:
        faces = predict_cache(cfg, [predictor] + ([other] if other is not None else []))
    else:
        faces = predict_labelled_photos(cfg, predictor)
    if len(faces["rows"]) == 0:
        fail("no face to evaluate")
    report, metrics = build_report(cfg, predictor, other, faces)
    print_report(report, metrics, predictor)
    if cfg.json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
        with open(cfg.json, "w") as f:
            json.dump(_nan_to_none(report), f, indent=1)  # JSON has no NaN: unknown is null
    if cfg.plots:
        plot(predicted_age(faces["predictions"][0][1], predictor.age_estimate), faces["ages"], cfg.plots,
             faces["predictions"][0][0], faces["genders"])
        if "race_sex" in report["by"]:
            source = os.path.basename(os.path.dirname(os.path.abspath(cfg.labels)) if cfg.labels else os.path.normpath(cfg.cache))
            plot_gender_by_group(report["by"]["race_sex"], os.path.join(cfg.plots, "gender_by_group.png"), f"{source} {cfg.split}")
    return 0


if __name__ == "__main__":
    use_all_cores_for_cv2()  # a command-line run never forks, so cv2 may use every core
    sys.exit(main())
