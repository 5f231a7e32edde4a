"""Export a checkpoint to ONNX (dynamic batch axis) and check it against PyTorch in onnxruntime.

    python export_onnx.py                                   # the released model -> weights/*.onnx
    python export_onnx.py --checkpoint checkpoints/run/best.pt --out model.onnx
    python export_onnx.py --checkpoint checkpoints/run/best.pt --release weights/my_model.pt   # slim fp16 .pt
    python export_onnx.py --checkpoint checkpoints/a/best.pt checkpoints/b/best.pt --release soup.pt   # averaged
    python export_onnx.py --checkpoint a.pt b.pt --soup-weights 0.7 0.3 --release soup.pt   # 70% of a, 30% of b

--release writes the weights in fp16 with the config and metrics only (no optimizer state): the
form the released model ships in. Loading casts back to fp32. Several checkpoints are averaged weight by
weight first (models.average_checkpoints: for runs fine-tuned from one another; validate the result).

Inputs: `input` N x 3 x 112 x 96, ImageNet-normalised RGB (data_gen.normalize). Outputs:
`gender_prob` N x 2 (female, male), `age_prob` N x 101, `age` N (expected real age), `age_std` N, and for a
two-age network `apparent_age_prob`, `apparent_age`, `apparent_age_std` (the apparent age's): the
network's own outputs. What calibrate.py stores in a checkpoint is applied after the graph, as
predictor.AgeGenderPredictor does: the age read off `age_prob` as its median where `age_estimate` says so
(metrics.median_age; the released model), the std times `calibration["age_std_scale"]`, the gender logit
divided by `calibration["gender_temperature"]`.
"""
import argparse
import io
import os
import sys
import warnings

import numpy as np
import torch

import config
from models import CheckpointError, ExportWrapper, average_checkpoints, inference_weights, load_checkpoint, network_of
from utils import fail

OUTPUTS = ["gender_prob", "age_prob", "age", "age_std"]
# a two-age network's outputs that follow OUTPUTS: the apparent age's distribution, mean and std
APPARENT_OUTPUTS = ["apparent_age_prob", "apparent_age", "apparent_age_std"]


def outputs_of(net):
    """The names of the network's exported outputs, in ExportWrapper's order."""
    return OUTPUTS + (APPARENT_OUTPUTS if net.two_ages else [])


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


def onnx_bytes(net, tta=False):
    """The network's ONNX export, in memory (about a second)."""
    buf = io.BytesIO()
    export(net, buf, tta=tta)
    return buf.getvalue()


def network_session(net, tta=False, threads=0):
    """An onnxruntime session of the network, exported in memory (about a second): on a CPU it runs
    MobileNetV2 several times faster than PyTorch's eager mode at the batch sizes of a photo
    (bench.py infer), because it fuses the small depthwise layers that PyTorch calls one by one."""
    from detector import onnx_session

    return onnx_session(onnx_bytes(net, tta), threads or torch.get_num_threads())


def opencv_network(net, tta=False):
    """The network as an OpenCV dnn graph (cv2.dnn.readNetFromONNX on the ONNX export, in memory): on this
    project's CPUs it ran SFace's one view 1.4-1.8x faster than the frozen TorchScript graph, and a batch
    of 64 faces 2.7x faster (bench.py infer times both), with the same probabilities to 1e-6. None when
    this OpenCV cannot read the graph. Not thread-safe: one forward pass at a time (the predictor locks it)."""
    import cv2

    model = onnx_bytes(net, tta)
    try:
        return cv2.dnn.readNetFromONNX(np.frombuffer(model, np.uint8))
    except cv2.error:
        return None


def run_opencv_network(dnn, x, names=OUTPUTS):
    """Normalised faces (N x 3 x 112 x 96 float32 numpy array) through an opencv_network -> the arrays of
    the outputs `names` (outputs_of the network)."""
    dnn.setInput(np.ascontiguousarray(x, dtype=np.float32))
    return dnn.forward(names)


def frozen_network(net, tta=False):
    """The network as a frozen TorchScript graph optimised for CPU inference (torch.jit.optimize_for_inference:
    convolutions in oneDNN's blocked layout, bias and PReLU fused), with the outputs of ExportWrapper. It runs
    SFace's one view faster than eager mode (bench.py infer times both), where onnxruntime runs it slower. Takes
    about a second. None when TorchScript cannot take the network (it is deprecated in PyTorch 2.x)."""
    wrapper = ExportWrapper(net.eval(), tta=tta).eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": still the fastest path here
            traced = torch.jit.trace(wrapper, torch.zeros(2, 3, config.IMAGE_H, config.IMAGE_W))
            return torch.jit.optimize_for_inference(traced.eval())
    except Exception:
        return None


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


def release(ckpt, path):
    """A slim checkpoint: fp16 weights, config and metrics; loads with models.load_checkpoint."""
    from utils import atomic_torch_save

    slim = {"model": {k: v.half() if v.is_floating_point() else v for k, v in inference_weights(ckpt).items()},
            "config": ckpt["config"], "metrics": ckpt.get("metrics", {}), "epoch": ckpt.get("epoch"),
            "history": ckpt.get("history", []), "calibration": ckpt.get("calibration"),
            **{k: ckpt[k] for k in ("tta", "tta_zoom", "averaged_from", "soup_weights") if k in ckpt}}  # tta*: the calibration's views
    atomic_torch_save(slim, path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Export AgeGenderNet to ONNX", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=[config.RELEASED_MODEL],
                   help="the model to export; several: their weights averaged (runs fine-tuned from one another)")
    p.add_argument("--out", default=os.path.splitext(config.RELEASED_MODEL)[0] + ".onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--release", default="", help="also write a slim fp16 PyTorch checkpoint here")
    p.add_argument("--soup-weights", type=float, nargs="+", default=None,
                   help="with several --checkpoint: each one's share of the average (normalised to sum 1); "
                        "default: equal shares")
    args = p.parse_args(argv)
    if args.soup_weights is not None and len(args.soup_weights) != len(args.checkpoint):
        fail(f"--soup-weights: {len(args.soup_weights)} numbers for {len(args.checkpoint)} checkpoints")
    try:
        if len(args.checkpoint) == 1:
            net, ckpt = load_checkpoint(args.checkpoint[0])
        else:
            ckpt = average_checkpoints(args.checkpoint, args.soup_weights)
            net = network_of(ckpt, "the average")
            print(f"averaged the weights of {len(args.checkpoint)} checkpoints")
    except CheckpointError as e:
        fail(str(e))
    if args.release:
        release(ckpt, args.release)
        print(f"wrote {args.release} ({os.path.getsize(args.release) / 2**20:.1f} MiB, fp16)")
    export(net, args.out, args.opset)
    diff = max_difference(net, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB); max |PyTorch - onnxruntime| of the probabilities: {diff:.2e}")
    if diff > 1e-4:
        fail(f"{args.out}: onnxruntime differs from PyTorch by {diff:.2e} (> 1e-4)", code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
