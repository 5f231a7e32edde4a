"""What runs the network on a CPU or a GPU, for predictor.py: onnxruntime, OpenCV's dnn module, a frozen
TorchScript graph, or PyTorch's eager mode. Each computes the same outputs (models.ExportWrapper's); the
fastest differs by trunk and device (bench.py infer times them; docs/SPEED.md has the figures).
"""
import io
import threading
import warnings

import numpy as np
import torch

import config
from export_onnx import export
from models import OUTPUTS, ExportWrapper, outputs_of

# auto = onnxruntime on a CPU, or opencv (cv2.dnn) for OPENCV_ON_CPU, torch (eager) on a GPU
RUNTIMES = ("auto", "onnxruntime", "opencv", "torchscript", "torch")
# trunks that runtime "auto" runs in OpenCV's dnn module on a CPU rather than in onnxruntime: cv2.dnn fuses
# SFace's PReLU into its depthwise convolutions, which makes it the fastest runtime for SFace, one face or a batch
OPENCV_ON_CPU = ("sface",)


class NetworkRuntime:
    """The network in the runtime asked for (RUNTIMES); runtime(x) -> {output name: numpy array}.

    auto on a CPU: onnxruntime (MobileNetV2 runs 3-6x faster there than in eager mode), or cv2.dnn for the
    trunks in OPENCV_ON_CPU; eager PyTorch on a GPU. A runtime that cannot take the network falls back to
    the next fastest that computes the same (`name` says which runs)."""

    def __init__(self, net, runtime="auto", device="cpu", tta=False):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime '{runtime}' (choose from {', '.join(RUNTIMES)})")
        self.net, self.device, self.tta, self.names = net, torch.device(device), tta, outputs_of(net)
        self.session, self.frozen, self.dnn, requested = None, None, None, runtime
        self._dnn_lock = threading.Lock()  # cv2.dnn keeps its input and outputs inside the net
        if runtime == "auto":
            runtime = "torch" if self.device.type != "cpu" else "opencv" if net.arch in OPENCV_ON_CPU else "onnxruntime"
        elif runtime != "torch" and self.device.type != "cpu":
            raise ValueError(f"--runtime {runtime} runs on the CPU: use --device cpu")
        if runtime == "onnxruntime":
            try:
                self.session = network_session(net, tta=tta)
            except ImportError:
                if requested == "onnxruntime":
                    raise ValueError("--runtime onnxruntime needs `pip install onnx onnxruntime`")
                runtime = "torch"
        if runtime == "opencv":
            self.dnn = opencv_network(net, tta=tta)
            if self.dnn is None:  # an OpenCV that cannot read the graph: the next fastest for SFace
                runtime = "torchscript"
        if runtime == "torchscript":
            self.frozen = frozen_network(net, tta=tta)
            runtime = "torchscript" if self.frozen is not None else "torch"  # eager mode computes the same
        self.name = runtime

    @torch.no_grad()
    def __call__(self, x):
        """Normalised faces (N x 3 x 112 x 96 tensor) -> {output name: numpy array}, uncalibrated."""
        names = self.names
        if self.session is not None:
            return dict(zip(names, self.session.run(names, {"input": x.cpu().numpy()})))
        if self.dnn is not None:
            with self._dnn_lock:
                return dict(zip(names, (a.copy() for a in run_opencv_network(self.dnn, x.cpu().numpy(), names))))
        if self.frozen is not None:
            with torch.inference_mode():
                return dict(zip(names, (t.numpy() for t in self.frozen(x.cpu()))))
        return {k: v.cpu().numpy() for k, v in self.net.predict(x.to(self.device), tta=self.tta).items() if k in names}


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
