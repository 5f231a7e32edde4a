"""Does the gender output lean on the group? What a checkpoint's features say about the group, on a cache
whose faces have group labels (FairFace's seven, UTKFace's five).

    python probe.py --cache data/fairface                              # probes fit on train, figures on val
    python probe.py --cache data/utkface --json out/probe_utkface.json

It reads the faces once (one view, no calibration: the network's own gender margin, the male logit minus
the female one) and reports, on --split:
  - for each group x sex, gender accuracy and the mean margin; from them each group's `lean` (the mean of
    its women's and men's margins: where the group sits on the gender axis, 0 for none) and `separation`
    (half the distance between its women and men: how well the features tell them apart);
  - what the group leaves in the gender output: the share of the margin's variance within each sex that the
    group explains, and how often a probe (logistic regression) names the group from the margin and the sex
    alone, against a probe on the whole feature and against always naming the largest group;
  - gender accuracy by how strongly a face reads as its own group (tertiles of the whole-feature probe's
    probability of the face's group), within each group x sex.
A gender output that leaned on the group as a prior would show large leans of opposite signs, a margin probe
well above chance, and errors that grow with how typical a face is of its group; weak features show instead
as a small separation. The group is a label of the study, never an output of the model.
"""
import io
import json
import sys

import cv2
import numpy as np
import torch
from tqdm import tqdm

import config
from data_gen import CacheError, FaceCache
from evaluate import RACES
from models import CheckpointError, fuse_batchnorm, load_checkpoint, normalize
from runtimes import run_opencv_network
from utils import fail, parse_config


def group_names(races):
    """A cache's race column as group names (UTKFace stores codes, evaluate.RACES); '' where unknown."""
    return np.array([RACES.get(r, r) if r not in ("", "-1") else "" for r in races])


def trunk_runner(net):
    """The trunk as an OpenCV dnn graph: on a CPU it runs SFace several times faster than eager PyTorch
    (runtimes.opencv_network), which matters for the tens of thousands of faces a probe reads."""
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(net.trunk, torch.zeros(2, 3, config.IMAGE_H, config.IMAGE_W), buf, input_names=["input"],
                          output_names=["features"], dynamic_axes={"input": {0: "n"}, "features": {0: "n"}}, dynamo=False)
    try:
        dnn = cv2.dnn.readNetFromONNX(np.frombuffer(buf.getvalue(), np.uint8))
    except cv2.error:  # an OpenCV that cannot read the graph: eager PyTorch computes the same
        return lambda x: net.trunk(torch.from_numpy(x)).numpy()
    return lambda x: run_opencv_network(dnn, x, ["features"])[0].reshape(len(x), -1)


def read_features(trunk, ds, positions, batch_size, desc):
    """The trunk's features (N x 1024) of a cache's faces at `positions`, read in batches."""
    parts = [trunk(normalize(ds.read(positions[s:s + batch_size])[0]).numpy())
             for s in tqdm(range(0, len(positions), batch_size), desc=desc, unit="batch")]
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def lean_and_separation(margin, sex, groups):
    """Per group: accuracy-free figures of the margin (male minus female logit) by sex: {group: {women, men,
    lean, separation}}, each group's women and men weighing the same whatever their numbers."""
    out = {}
    for g in sorted(set(groups.tolist()) - {""}):
        f, m = margin[(groups == g) & (sex == 0)], margin[(groups == g) & (sex == 1)]
        if len(f) and len(m):
            out[g] = {"women": float(f.mean()), "men": float(m.mean()), "lean": float((f.mean() + m.mean()) / 2),
                      "separation": float((m.mean() - f.mean()) / 2)}
    return out


def variance_explained(values, groups):
    """The share of the variance of `values` that the group means explain (eta squared)."""
    total = values.var()
    if total == 0:
        return 0.0
    between = sum((groups == g).sum() * (values[groups == g].mean() - values.mean()) ** 2 for g in set(groups.tolist()))
    return float(between / len(values) / total)


def fit_probe(x, y, classes, l2=1e-3, steps=200):
    """Multinomial logistic regression (L-BFGS) on standardised x: returns predict(x) -> class probabilities."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.from_numpy(((x - mu) / sd).astype(np.float32)), torch.from_numpy(y).long()
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: torch.softmax(torch.from_numpy(((z - mu) / sd).astype(np.float32)) @ w.T + b, 1).numpy()


def accuracy_by_typicality(right, own_prob, sex, groups):
    """Gender accuracy in the tertiles of own_prob (low to high) within each group x sex: {"group F": [a, b, c]}."""
    out = {}
    for g in sorted(set(groups.tolist()) - {""}):
        for s, name in ((0, "F"), (1, "M")):
            m = (groups == g) & (sex == s)
            if m.sum() < 3:
                continue
            tertile = np.digitize(own_prob[m], np.quantile(own_prob[m], [1 / 3, 2 / 3]))
            out[f"{g} {name}"] = [float(right[m][tertile == k].mean()) if (tertile == k).any() else None for k in range(3)]
    return out


def study(features, margin, sex, groups, fit_features, fit_margin, fit_sex, fit_groups):
    """Every figure of the report from the features and margins of the faces measured and of those the probes fit on."""
    names = sorted(set(fit_groups.tolist()) - {""})
    index = {g: k for k, g in enumerate(names)}
    known, fit_known = np.isin(groups, names) & (sex >= 0), np.isin(fit_groups, names) & (fit_sex >= 0)
    feature_probe = fit_probe(fit_features[fit_known], np.array([index[g] for g in fit_groups[fit_known]]), len(names))
    pairs = lambda mg, sx: np.stack([mg, sx, mg * sx], 1)  # the margin and the sex, and their interaction
    margin_probe = fit_probe(pairs(fit_margin, fit_sex)[fit_known], np.array([index[g] for g in fit_groups[fit_known]]), len(names))
    truth = np.array([index[g] for g in groups[known]])
    p_feature = feature_probe(features[known])
    right = (margin > 0).astype(int) == sex
    report = {"n": int(known.sum()), "gender_acc": float(right[known].mean()),
              "by_group_sex": {f"{g} {name}": {"n": int(((groups == g) & (sex == s)).sum()),
                                               "gender_acc": float(right[(groups == g) & (sex == s)].mean())}
                               for g in names for s, name in ((0, "F"), (1, "M")) if ((groups == g) & (sex == s)).any()},
              "margin": lean_and_separation(margin[known], sex[known], groups[known]),
              "group_share_of_margin_variance": {name: variance_explained(margin[known & (sex == s)], groups[known & (sex == s)])
                                                 for s, name in ((0, "women"), (1, "men"))},
              "probe_accuracy": {"whole_feature": float((p_feature.argmax(1) == truth).mean()),
                                 "margin_and_sex": float((margin_probe(pairs(margin, sex)[known]).argmax(1) == truth).mean()),
                                 "largest_group": float(np.bincount(truth).max() / len(truth))},
              "gender_acc_by_typicality": accuracy_by_typicality(right[known], p_feature[np.arange(len(truth)), truth],
                                                                  sex[known], groups[known])}
    return report


def print_report(report, cache, split):
    print(f"{cache} {split}: {report['n']} faces, gender {100 * report['gender_acc']:.2f}% (one view, the network's own margin)")
    print(f"{'group':<18} {'women%':>7} {'men%':>7} {'margin F':>9} {'margin M':>9} {'lean':>6} {'separation':>10}")
    for g, m in report["margin"].items():
        f, mm = report["by_group_sex"][f"{g} F"], report["by_group_sex"][f"{g} M"]
        print(f"{g:<18} {100 * f['gender_acc']:>7.1f} {100 * mm['gender_acc']:>7.1f} {m['women']:>+9.2f} {m['men']:>+9.2f} "
              f"{m['lean']:>+6.2f} {m['separation']:>10.2f}")
    v, p = report["group_share_of_margin_variance"], report["probe_accuracy"]
    print(f"the group explains {100 * v['women']:.1f}% of the margin's variance among women, {100 * v['men']:.1f}% among men")
    print(f"a probe names the group from the whole feature {100 * p['whole_feature']:.1f}% of the time, from the margin and the sex "
          f"{100 * p['margin_and_sex']:.1f}% (always the largest group: {100 * p['largest_group']:.1f}%)")
    print("gender accuracy by how strongly the face reads as its own group (tertiles, low to high):")
    for cell, accs in report["gender_acc_by_typicality"].items():
        print(f"  {cell:<20} " + " ".join("  -  " if a is None else f"{100 * a:5.1f}" for a in accs))


def main(argv=None):
    cfg = parse_config(config.ProbeConfig, argv, description=__doc__.split("\n")[0])
    try:
        net, _ = load_checkpoint(cfg.checkpoint)
        measured, fitted = FaceCache(cfg.cache, split=cfg.split), FaceCache(cfg.cache, split=cfg.fit_split)
    except (CheckpointError, CacheError) as e:
        fail(str(e))
    groups, fit_groups = group_names(measured.races), group_names(fitted.races)
    if not (groups != "").any() or len(set(fit_groups.tolist()) - {""}) < 2:
        fail(f"{cfg.cache}: its meta.csv has no race column with two groups or more (FairFace and UTKFace caches do)")
    net = fuse_batchnorm(net).eval()
    trunk = trunk_runner(net)
    w = net.gender_head.weight.detach().numpy()
    b = net.gender_head.bias.detach().numpy()
    direction, offset = w[1] - w[0], float(b[1] - b[0])
    fit_pos = np.sort(np.random.default_rng(0).permutation(len(fitted))[:cfg.max_fit])
    features = read_features(trunk, measured, np.arange(len(measured)), cfg.batch_size, cfg.split)
    fit_features = read_features(trunk, fitted, fit_pos, cfg.batch_size, cfg.fit_split)
    report = study(features, features @ direction + offset, measured.genders.numpy(), groups,
                   fit_features, fit_features @ direction + offset, fitted.genders.numpy()[fit_pos], fit_groups[fit_pos])
    report.update(checkpoint=cfg.checkpoint, cache=cfg.cache, split=cfg.split, fit_split=cfg.fit_split, fit_faces=len(fit_pos))
    print_report(report, cfg.cache, cfg.split)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
