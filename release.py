"""Make a release checkpoint: one slim fp16 file, optionally a weight soup of several runs.

    python release.py --checkpoint checkpoints/run/best.pt --out weights/my_model.pt
    python release.py --checkpoint checkpoints/a/best.pt checkpoints/b/best.pt --out soup.pt        # averaged
    python release.py --checkpoint a.pt b.pt --soup-weights 0.7 0.3 --out soup.pt                  # 70% of a, 30% of b

A release holds the weights in fp16 with the config, metrics and calibration only (no optimizer state):
the form the released model ships in; loading casts back to fp32. Several checkpoints are averaged weight
by weight first (average_checkpoints: for runs fine-tuned from one another; validate the result, then
calibrate it with calibrate.py). export_onnx.py exports a release to ONNX and checks it there.
"""
import argparse
import math
import os
import sys

import config
from models import CheckpointError, inference_weights, load_checkpoint, with_apparent_head
from utils import atomic_torch_save, fail


def average_checkpoints(paths, weights=None):
    """One checkpoint whose weights are the mean of several (a "model soup", Wortsman et al. 2022).

    Meant for runs fine-tuned from one another (train.py --pretrained a checkpoint), which stay in one
    basin of the loss, so their average is a network of its own, often better than each, at the cost of
    one. Runs trained from different starts average to garbage: validate the result (evaluate.py).
    BatchNorm statistics are averaged too. The config, views and history are the first checkpoint's.
    `weights`: one share per path (positive, normalised to sum 1), for a soup that leans to one side of the
    line between two runs; None = equal shares."""
    shares = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(shares) != len(paths) or not all(w > 0 and math.isfinite(w) for w in shares):
        raise CheckpointError(f"soup weights {list(weights)}: need one positive number per checkpoint ({len(paths)})")
    shares = [w / sum(shares) for w in shares]
    ckpts = []
    for path in paths:
        _, ckpt = load_checkpoint(path)  # one line for a missing or foreign file, or weights that do not fit
        ckpts.append(ckpt)
    first, states = ckpts[0], [inference_weights(c) for c in ckpts]
    if any("apparent_head.weight" in state for state in states):
        states = [with_apparent_head(state) for state in states]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        if ckpt["config"].get("arch") != first["config"].get("arch"):
            raise CheckpointError(f"{path}: a {ckpt['config'].get('arch')} checkpoint cannot be averaged with "
                                  f"{first['config'].get('arch')} ({paths[0]})")
    averaged = {k: (sum(share * state[k] for share, state in zip(shares, states)) if v.is_floating_point() else v)
                for k, v in states[0].items()}
    return {**{k: first[k] for k in ("config", "history", "tta", "tta_zoom") if k in first},
            "model": averaged, "metrics": {}, "epoch": None, "averaged_from": [_repo_relative(p) for p in paths],
            **({"soup_weights": [round(w, 6) for w in shares]} if weights is not None else {})}


def _repo_relative(path):
    """A path as the README's commands write it (relative to the repository) when it lies inside it."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, config.ROOT]) == os.path.abspath(config.ROOT)
    return os.path.relpath(path, config.ROOT) if inside else path


def release(ckpt, path):
    """A slim checkpoint: fp16 weights, config and metrics; loads with models.load_checkpoint."""
    slim = {"model": {k: v.half() if v.is_floating_point() else v for k, v in inference_weights(ckpt).items()},
            "config": ckpt["config"], "metrics": ckpt.get("metrics", {}), "epoch": ckpt.get("epoch"),
            "history": ckpt.get("history", []), "calibration": ckpt.get("calibration"),
            **{k: ckpt[k] for k in ("tta", "tta_zoom", "averaged_from", "soup_weights") if k in ckpt}}  # tta*: the calibration's views
    atomic_torch_save(slim, path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a slim fp16 release checkpoint (a weight soup of several)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="the checkpoint to release; several: their weights averaged (runs fine-tuned from one another)")
    p.add_argument("--out", required=True, help="the release file to write")
    p.add_argument("--soup-weights", type=float, nargs="+", default=None,
                   help="with several --checkpoint: each one's share of the average (normalised to sum 1); default: equal shares")
    args = p.parse_args(argv)
    if args.soup_weights is not None and len(args.soup_weights) != len(args.checkpoint):
        fail(f"--soup-weights: {len(args.soup_weights)} numbers for {len(args.checkpoint)} checkpoints")
    try:
        if len(args.checkpoint) == 1:
            ckpt = load_checkpoint(args.checkpoint[0])[1]
        else:
            ckpt = average_checkpoints(args.checkpoint, args.soup_weights)
            print(f"averaged the weights of {len(args.checkpoint)} checkpoints")
    except CheckpointError as e:
        fail(str(e))
    release(ckpt, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, fp16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
