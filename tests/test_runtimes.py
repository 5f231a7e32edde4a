"""runtimes.py: onnxruntime, cv2.dnn, TorchScript and eager PyTorch give the same predictions, and fall back in turn."""
import os

import cv2
import numpy as np
import pytest
import torch

import runtimes
from conftest import ASTRONAUT, UTK, utk_rows
from models import normalize
from predictor import AgeGenderPredictor
from utils import read_image


@pytest.fixture(scope="module")
def predictor():
    return AgeGenderPredictor(device="cpu")


def test_onnxruntime_and_pytorch_give_the_same_predictions(predictor):
    """--runtime onnxruntime exports the network in memory (test-time views inside the graph); auto runs
    SFace in OpenCV's dnn module on a CPU, which is faster for it; torchscript is a frozen graph, torch eager mode."""
    assert predictor.runtime == ("opencv" if predictor.net.arch in runtimes.OPENCV_ON_CPU else "onnxruntime")
    assert (predictor.network.dnn is not None) == (predictor.runtime == "opencv") and predictor.network.frozen is None
    ort_run = AgeGenderPredictor(device="cpu", runtime="onnxruntime")
    assert ort_run.network.session is not None and not ort_run.net.training  # exporting it must leave the network in eval mode
    torch_run = AgeGenderPredictor(device="cpu", runtime="torch")
    assert torch_run.network.session is None and torch_run.network.frozen is None
    script_run = AgeGenderPredictor(device="cpu", runtime="torchscript")
    assert script_run.network.frozen is not None
    rows = utk_rows("test", 16, seed=11)
    crops = np.stack([cv2.resize(read_image(os.path.join(UTK, r["file"]))[40:152, 52:148], (96, 112)) for r in rows])
    a, b = ort_run.predict_crops(crops), torch_run.predict_crops(crops)
    assert np.abs(a["age_prob"] - b["age_prob"]).max() < 1e-4 and np.abs(a["gender_prob"] - b["gender_prob"]).max() < 1e-4
    assert np.abs(a["age"] - b["age"]).max() < 0.01 and np.abs(a["age_std"] - b["age_std"]).max() < 0.01
    cv_run = AgeGenderPredictor(device="cpu", runtime="opencv")
    assert cv_run.network.dnn is not None and cv_run.runtime == "opencv"
    for e in (script_run.predict_crops(crops), cv_run.predict_crops(crops), cv_run.predict_crops(crops[:1])):
        n = len(e["age"])
        assert np.abs(e["age_prob"] - b["age_prob"][:n]).max() < 1e-4 and np.abs(e["gender_prob"] - b["gender_prob"][:n]).max() < 1e-4
        assert np.abs(e["age"] - b["age"][:n]).max() < 0.01 and np.abs(e["age_std"] - b["age_std"][:n]).max() < 0.01
    four = AgeGenderPredictor(device="cpu", tta=True)  # the four views, inside the ONNX graph
    four_torch = AgeGenderPredictor(device="cpu", tta=True, runtime="torch")
    c, d = four.predict_crops(crops), four_torch.predict_crops(crops)
    assert np.abs(c["age_prob"] - d["age_prob"]).max() < 1e-4 and np.abs(c["gender_prob"] - d["gender_prob"]).max() < 1e-4
    one = AgeGenderPredictor(device="cpu", tta=False).predict_crops(crops)
    assert np.abs(c["age"] - one["age"]).max() > 0.01  # the other views are really averaged in
    x = normalize(crops)
    with torch.no_grad():  # the face and its mirror image alone (two views of four)
        mirror_only = (torch_run.net.probabilities(x)[1] + torch_run.net.probabilities(torch.flip(x, dims=[3]))[1]) / 2
    assert (mirror_only - torch.from_numpy(d["age_prob"])).abs().max() > 1e-3  # ... and so is the enlarged view
    with pytest.raises(ValueError, match="unknown runtime"):
        AgeGenderPredictor(device="cpu", runtime="tensorrt")


def test_opencv_runtime_falls_back_to_torchscript_when_cv2_cannot_read_the_graph(monkeypatch):
    read = cv2.dnn.readNetFromONNX

    def refuse(model, *args):  # the detectors' files still load; the network's graph (bytes) does not
        if isinstance(model, str):
            return read(model, *args)
        raise cv2.error("this OpenCV cannot read the graph")

    monkeypatch.setattr(cv2.dnn, "readNetFromONNX", refuse)
    assert runtimes.opencv_network(AgeGenderPredictor(device="cpu", runtime="torch").net) is None
    run = AgeGenderPredictor(device="cpu", runtime="opencv")
    assert run.runtime == "torchscript" and run.network.dnn is None and run.network.frozen is not None
    assert len(run(ASTRONAUT)) == 1


def test_torchscript_falls_back_to_eager_mode_when_tracing_fails(monkeypatch):
    """TorchScript is deprecated: a PyTorch that refuses to trace must leave the demo working, in eager mode."""
    def refuse(*args, **kwargs):
        raise RuntimeError("TorchScript is gone")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    run = AgeGenderPredictor(device="cpu", runtime="torchscript")
    assert run.runtime == "torch" and run.network.frozen is None and run.network.session is None
    faces = run(ASTRONAUT)
    assert len(faces) == 1 and faces[0].gender in ("F", "M")
