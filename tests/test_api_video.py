"""The Python API, video tracking, folder runs on several processes, --help and --resume behaviour."""
import argparse
import csv
import json
import os
import shutil
from collections import defaultdict

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import config
import demo
from predictor import AgeGenderPredictor, FaceRecord, OPENCV_ON_CPU
import train
from conftest import UTK, parser_of, utk_rows
from data_gen import normalize
from models import zoom_matrix
from tracker import FaceTracker
from utils import read_image

ASTRONAUT = os.path.join(config.ROOT, "images", "astronaut.jpg")


@pytest.fixture(scope="module")
def predictor():
    return AgeGenderPredictor(device="cpu")


def test_api_gives_the_same_records_for_path_array_and_pil(predictor):
    by_path = predictor(ASTRONAUT)
    by_array = predictor(read_image(ASTRONAUT))
    by_pil = predictor(Image.open(ASTRONAUT))
    assert len(by_path) == 1 and by_path == by_array == by_pil
    face = by_path[0]
    assert isinstance(face, FaceRecord) and face.gender in ("F", "M") and 0.5 <= face.gender_prob <= 1
    assert len(face.box) == 4 and np.asarray(face.landmarks).shape == (5, 2) and face.age_distribution is None
    with_dist = predictor(ASTRONAUT, distribution=True)[0]
    assert len(with_dist.age_distribution) == 101 and sum(with_dist.age_distribution) == pytest.approx(1, abs=1e-3)
    gray = predictor(np.asarray(Image.open(ASTRONAUT).convert("L")))  # a 2-D array is grayscale
    assert len(gray) == 1
    with pytest.raises(demo.InputError):
        predictor(np.zeros((5, 5, 7), np.uint8))


def test_predict_many_equals_one_by_one(predictor):
    photos = [ASTRONAUT, os.path.join(config.ROOT, "images", "collage.jpg"), os.path.join(config.ROOT, "images", "grace_hopper.jpg")]
    many = predictor.predict_many(photos, batch_size=2)
    single = [predictor(p) for p in photos]
    assert [len(m) for m in many] == [1, 3, 1]
    for m, s in zip(many, single):
        for a, b in zip(m, s):
            assert a.box == b.box and a.gender == b.gender
            assert a.age == pytest.approx(b.age, abs=0.15) and a.gender_prob == pytest.approx(b.gender_prob, abs=2e-3)


def test_onnxruntime_and_pytorch_give_the_same_predictions(predictor):
    """--runtime onnxruntime exports the network in memory (test-time views inside the graph); auto runs
    SFace in OpenCV's dnn module on a CPU, which is faster for it; torchscript is a frozen graph, torch eager mode."""
    assert predictor.runtime == ("opencv" if predictor.net.arch in OPENCV_ON_CPU else "onnxruntime")
    assert (predictor.dnn is not None) == (predictor.runtime == "opencv") and predictor.frozen is None
    ort_run = AgeGenderPredictor(device="cpu", runtime="onnxruntime")
    assert ort_run.session is not None and not ort_run.net.training  # exporting it must leave the network in eval mode
    torch_run = AgeGenderPredictor(device="cpu", runtime="torch")
    assert torch_run.session is None and torch_run.frozen is None
    script_run = AgeGenderPredictor(device="cpu", runtime="torchscript")
    assert script_run.frozen is not None
    rows = utk_rows("test", 16, seed=11)
    crops = np.stack([cv2.resize(read_image(os.path.join(UTK, r["file"]))[40:152, 52:148], (96, 112)) for r in rows])
    a, b = ort_run.predict_crops(crops), torch_run.predict_crops(crops)
    assert np.abs(a["age_prob"] - b["age_prob"]).max() < 1e-4 and np.abs(a["gender_prob"] - b["gender_prob"]).max() < 1e-4
    assert np.abs(a["age"] - b["age"]).max() < 0.01 and np.abs(a["age_std"] - b["age_std"]).max() < 0.01
    cv_run = AgeGenderPredictor(device="cpu", runtime="opencv")
    assert cv_run.dnn is not None and cv_run.runtime == "opencv"
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


def test_zoom_matrix_is_grid_samples_zoom():
    """The enlarged view of test-time augmentation: two constant matmuls equal to F.grid_sample's zoom."""
    x = torch.randn(3, 3, config.IMAGE_H, config.IMAGE_W, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor([[1 / 1.08, 0.0, 0.0], [0.0, 1 / 1.08, 0.0]]).expand(3, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    got = zoom_matrix(config.IMAGE_H, 1.08) @ x @ zoom_matrix(config.IMAGE_W, 1.08).T
    assert (ref - got).abs().max() < 1e-4
    assert torch.allclose(zoom_matrix(10, 1.0), torch.eye(10), atol=1e-6)  # no zoom: the identity
    assert torch.allclose(zoom_matrix(config.IMAGE_W, 1.08).sum(1), torch.ones(config.IMAGE_W))  # weights sum to 1


def _crossing_clip(path, n=48):
    """Two real faces (25 and 55 years old) moving in opposite directions, growing and shrinking, the
    older one passing in front of the younger one halfway; returns the true face centres per frame."""
    rows = utk_rows("test", 200, seed=3)
    young = next(r for r in rows if 25 <= int(r["age"]) <= 35)
    old = next(r for r in rows if 55 <= int(r["age"]) <= 70)
    fa, fb = read_image(os.path.join(UTK, young["file"])), read_image(os.path.join(UTK, old["file"]))
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 12, (640, 480))
    truth = []
    for t in range(n):
        u = t / (n - 1)
        frame = np.empty((480, 640, 3), np.uint8)
        frame[:] = np.linspace(100, 200, 640)[None, :, None].astype(np.uint8)
        sa, sb = int(110 + 40 * u), int(150 - 40 * u)
        xa, xb = int(20 + 460 * u), int(480 - 460 * u)
        for face, x, y, s in ((fa, xa, 90, sa), (fb, xb, 170, sb)):
            img = cv2.resize(face, (s, s), interpolation=cv2.INTER_AREA).astype(np.float32)
            frame[y:y + s, x:x + s] = np.clip(img * rng.uniform(0.8, 1.2) + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        truth.append(((xa + sa / 2, 90 + sa / 2), (xb + sb / 2, 170 + sb / 2)))
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return np.array(truth)


@pytest.mark.parametrize("detect_every", [1, 2, 3])  # 2: demo.py's default
def test_video_tracks_keep_identities_and_steady_labels(tmp_path, capsys, detect_every):
    truth = _crossing_clip(tmp_path / "clip.mp4")
    assert demo.main([str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "o"), "--json", str(tmp_path / "v.json"),
                      "--detect-every", str(detect_every)]) == 0
    video = json.loads((tmp_path / "v.json").read_text())[0]
    who_by_track, raw_age, shown_age = defaultdict(set), defaultdict(list), defaultdict(list)
    for fr in video["frames"]:
        for f in fr["faces"]:
            centre = np.array([(f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2])
            who = int(np.argmin(np.linalg.norm(truth[fr["frame"]] - centre, axis=1)))
            who_by_track[f["track"]].add(who)
            raw_age[who].append(f["age"])
            shown_age[f["track"]].append(f["track_label"]["age"])
    long_tracks = [t for t in video["tracks"] if t["frames_seen"] >= 10]
    assert len(long_tracks) == 2  # one per person
    assert all(len(people) == 1 for people in who_by_track.values())  # no track ever holds both people: no swap
    for t in long_tracks:
        person = next(iter(who_by_track[t["id"]]))
        assert np.std(shown_age[t["id"]]) * 3 <= np.std(raw_age[person])  # the label shown flickers 3x less
        assert set(t) >= {"id", "first_frame", "last_frame", "frames_seen", "boxes", "age", "age_std", "gender", "gender_prob", "gender_unsure"}
    young, old = sorted(long_tracks, key=lambda t: t["age"])
    assert young["age"] < old["age"] - 15
    detected = [f["detected"] for fr in video["frames"] for f in fr["faces"]]
    assert sum(detected) == (len(detected) if detect_every == 1 else pytest.approx(len(detected) / detect_every, abs=3))


def test_tracker_ends_lost_tracks_and_starts_new_ones():
    face = {"box": [100, 100, 200, 200], "landmarks": [[130, 140], [170, 140], [150, 160], [135, 180], [165, 180]], "score": 1.0}
    far = {**face, "box": [400, 100, 500, 200], "landmarks": [[x + 300, y] for x, y in face["landmarks"]]}
    t = FaceTracker(max_lost=3)
    assert t.update(0, [face]) == [0]
    assert t.update(1, [face, far]) == [0, 1]
    assert t.update(9, [face]) == [2]  # unseen for 8 frames: a new person as far as we know


def test_folder_with_two_workers_gives_the_same_output(tmp_path, capsys):
    folder = tmp_path / "in"
    os.makedirs(folder)
    for k, r in enumerate(utk_rows("val", 5, seed=2)):
        photo = read_image(os.path.join(UTK, r["file"]))
        Image.fromarray(cv2.copyMakeBorder(photo, 60, 60, 60, 60, cv2.BORDER_CONSTANT, value=(120, 120, 120))).save(folder / f"p{k}.jpg")
    shutil.copy(ASTRONAUT, folder / "z_astronaut.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff junk")
    outs = {}
    for w in (1, 2):
        code = demo.main([str(folder), "--workers", str(w), "--no-draw", "--json", str(tmp_path / f"w{w}.json"), "--csv", str(tmp_path / f"w{w}.csv"),
                          "--out", str(tmp_path / f"o{w}")])
        err = capsys.readouterr().err
        assert code == 1 and "broken.jpg" in err
        outs[w] = (json.loads((tmp_path / f"w{w}.json").read_text()), (tmp_path / f"w{w}.csv").read_text())
        assert not os.path.exists(tmp_path / f"o{w}")  # --no-draw writes no images
    assert outs[1] == outs[2]
    rows = list(csv.DictReader(open(tmp_path / "w1.csv")))
    assert len(rows) == sum(len(r["faces"]) for r in outs[1][0]) >= 5
    assert set(rows[0]) == {"file", "frame", "face", "track", "x1", "y1", "x2", "y2", "score", "gender", "gender_prob", "gender_unsure", "age", "age_std",
                            "apparent_age", "apparent_age_std"}


def test_every_option_of_every_script_has_a_help_line():
    import bench
    import calibrate
    import evaluate
    import export_onnx
    import pre_process

    for module in (pre_process, train, evaluate, demo, bench, export_onnx, calibrate):
        parser = parser_of(module.main)
        assert "usage" in parser.format_help()  # every help expands (a bare % in config.py's comments would not)
        for action in parser._actions:
            if action.dest != "help":
                assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{module.__name__}: {action.option_strings or action.dest}"
    arch = next(a for a in parser_of(train.main)._actions if a.dest == "arch")
    assert set(arch.choices) == {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "sface"}


def test_command_line_folder_run_with_workers_does_not_hang(tmp_path):
    """The command line lets cv2 use every core in the main process; workers must fork before that
    (a process forked after cv2 started its thread pool deadlocks), so run it as users do."""
    import subprocess
    import sys

    folder = tmp_path / "in"
    os.makedirs(folder)
    for name in ("astronaut.jpg", "grace_hopper.jpg", "collage.jpg"):
        shutil.copy(os.path.join(config.ROOT, "images", name), folder / name)
    cmd = [sys.executable, os.path.join(config.ROOT, "demo.py"), str(folder), "--workers", "2", "--json", str(tmp_path / "r.json"),
           "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-1000:]
    assert [len(r["faces"]) for r in json.loads((tmp_path / "r.json").read_text())] == [1, 3, 1]


def test_opencv_runtime_falls_back_to_torchscript_when_cv2_cannot_read_the_graph(monkeypatch):
    import export_onnx

    read = cv2.dnn.readNetFromONNX

    def refuse(model, *args):  # the detectors' files still load; the network's graph (bytes) does not
        if isinstance(model, str):
            return read(model, *args)
        raise cv2.error("this OpenCV cannot read the graph")

    monkeypatch.setattr(cv2.dnn, "readNetFromONNX", refuse)
    assert export_onnx.opencv_network(AgeGenderPredictor(device="cpu", runtime="torch").net) is None
    run = AgeGenderPredictor(device="cpu", runtime="opencv")
    assert run.runtime == "torchscript" and run.dnn is None and run.frozen is not None
    assert len(run(ASTRONAUT)) == 1


def test_torchscript_falls_back_to_eager_mode_when_tracing_fails(monkeypatch):
    """TorchScript is deprecated: a PyTorch that refuses to trace must leave the demo working, in eager mode."""
    def refuse(*args, **kwargs):
        raise RuntimeError("TorchScript is gone")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    run = AgeGenderPredictor(device="cpu", runtime="torchscript")
    assert run.runtime == "torch" and run.frozen is None and run.session is None
    faces = run(ASTRONAUT)
    assert len(faces) == 1 and faces[0].gender in ("F", "M")
