"""Export a checkpoint to ONNX (dynamic batch axis) and check it against PyTorch in onnxruntime.

    python export_onnx.py                                   # the released model -> weights/*.onnx
    python export_onnx.py --checkpoint checkpoints/run/best.pt --out model.onnx

Inputs: `input` N x 3 x 112 x 96, ImageNet-normalised RGB (data_gen.normalize). Outputs:
`gender_prob` N x 2 (female, male), `age_prob` N x 101, `age` N (expected real age), `age_std` N, and for a
two-age network `apparent_age_prob`, `apparent_age`, `apparent_age_std` (the apparent age's): the
network's own outputs. What calibrate.py stores in a checkpoint is applied after the graph, as
predictor.AgeGenderPredictor does: the age read off `age_prob` as its median where `age_estimate` says so
(metrics.median_age; the released model), the std times `calibration["age_std_scale"]`, the gender logit
divided by `calibration["gender_temperature"]`, and the second look where `gender_second_look_below` is set
(0.9 for the released model): a face whose `gender_prob` is under it runs again flipped left to right, and its
`gender_prob` is the average of the two, before the temperature. release.py writes slim release checkpoints and
weight soups.
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

import config
from models import CheckpointError, ExportWrapper, load_checkpoint, outputs_of
from utils import fail

def export(net, path, opset=17, tta=False):
    """Write the network as ONNX to `path` (a file name or a binary file object, e.g. io.BytesIO)."""
    # the wrapper in eval mode too: torch.onnx.export puts the module back into the mode it found it in,
    # and a fresh wrapper is in training mode, which would leave `net` in training mode after the export
    wrapper = ExportWrapper(net.eval(), tta=tta).eval()
    dummy = torch.randn(2, 3, config.IMAGE_H, config.IMAGE_W)
    if isinstance(path, str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    names = outputs_of(net)
    torch.onnx.export(wrapper, (dummy,), path, input_names=["input"], output_names=names, opset_version=opset,
                      dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in names}}, dynamo=False)
    return path


def max_difference(net, path, batch=8, seed=0):
    """Largest absolute difference of the probabilities between PyTorch and onnxruntime."""
    from detector import onnx_session

    x = torch.randn(batch, 3, config.IMAGE_H, config.IMAGE_W, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = [t.numpy() for t in ExportWrapper(net.eval())(x)]
    sess = onnx_session(path)
    names = outputs_of(net)
    got = dict(zip(names, sess.run(names, {"input": x.numpy()})))
    return max(float(np.abs(r - got[name]).max()) for r, name in zip(ref, names) if name.endswith("_prob"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Export AgeGenderNet to ONNX", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="the model to export")
    p.add_argument("--out", default=os.path.splitext(config.RELEASED_MODEL)[0] + ".onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    args = p.parse_args(argv)
    try:
        net = load_checkpoint(args.checkpoint)[0]
    except CheckpointError as e:
        fail(str(e))
    export(net, args.out, args.opset)
    diff = max_difference(net, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB); max |PyTorch - onnxruntime| of the probabilities: {diff:.2e}")
    if diff > 1e-4:
        fail(f"{args.out}: onnxruntime differs from PyTorch by {diff:.2e} (> 1e-4)", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
