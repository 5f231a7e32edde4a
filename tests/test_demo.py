"""The released model, demo.py, evaluate.py and the ONNX export."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import config
import demo
from predictor import AgeGenderPredictor
import evaluate
from conftest import UTK, run_main as run, utk_rows, write_csv
from export_onnx import export, max_difference
from models import AgeGenderNet, load_checkpoint
from utils import read_image


def test_released_model_beats_a_constant_guess_on_utkface_test(tmp_path, capsys):
    ckpt = torch.load(config.RELEASED_MODEL, map_location="cpu", weights_only=True)
    assert ckpt["config"]["arch"] in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "sface")
    assert os.path.getsize(config.RELEASED_MODEL) < 25 * 2**20
    rows = utk_rows("test", 150, seed=11)
    labels = write_csv(rows, tmp_path / "test.csv")
    code, out, _ = run(evaluate.main, ["--labels", labels, "--root", UTK, "--detect", "--pad-fraction", "0.25",
                                       "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    ages = np.array([int(x["age"]) for x in rows])
    with open(os.path.join(UTK, "labels.csv")) as f:
        train_ages = np.array([int(x["age"]) for x in csv.DictReader(f) if x["split"] == "train"])
    constant_mae = np.abs(ages - np.median(train_ages)).mean()  # the best constant guess, roughly
    majority = max(np.mean([x["gender"] == "1" for x in rows]), np.mean([x["gender"] == "0" for x in rows]))
    assert r["faces_found"] >= 140
    assert r["age_kind"] == "real" and r["age_output"] == "age"  # UTKFace's ages are real: the age output is scored
    assert r["age_mae"] < 0.5 * constant_mae
    assert r["gender_acc"] > majority + 0.2
    assert set(r["by"]) == {"age_group", "gender", "race", "pose"}  # pose: from the detected landmarks
    assert sum(v["n"] for v in r["by"]["pose"].values()) == r["faces_found"] and r["by"]["pose"]["frontal"]["n"] > 100
    assert 0 <= r["unsure"] < 0.5 and r["sure_acc"] >= r["gender_acc"]  # the faces left sure are the better ones


def _photos(tmp_path):
    good = tmp_path / "in"
    os.makedirs(good)
    shutil.copy(os.path.join(config.ROOT, "images", "astronaut.jpg"), good / "astronaut.jpg")
    Image.open(good / "astronaut.jpg").convert("L").save(good / "gray.png")
    return good


def test_demo_on_good_and_bad_files(tmp_path, capsys):
    folder = _photos(tmp_path)
    data = (folder / "astronaut.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(data[: len(data) // 4])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not a picture")
    Image.fromarray(np.full((300, 300, 3), 90, np.uint8)).save(folder / "wall.jpg")
    out, js = tmp_path / "out", tmp_path / "demo.json"
    code, stdout, err = run(demo.main, [str(folder), str(tmp_path / "missing.jpg"), "--out", str(out), "--json", str(js)], capsys)
    assert code == 1
    records = {os.path.basename(r["file"]): r for r in json.loads(js.read_text())}
    assert len(records) == 7
    for name in ("astronaut.jpg", "gray.png"):
        faces = records[name]["faces"]
        assert len(faces) == 1 and "error" not in records[name]
        f = faces[0]
        assert set(f) == {"box", "score", "landmarks", "gender", "gender_prob", "gender_unsure", "age", "age_std",
                          "apparent_age", "apparent_age_std"}  # the released model has two ages
        assert f["gender"] in ("F", "M") and 0.5 <= f["gender_prob"] <= 1 and 0 <= f["age"] <= 100 and f["age_std"] > 0
        assert f["gender_unsure"] == (f["gender_prob"] < AgeGenderPredictor().unsure_below)
        assert 150 < f["box"][0] < f["box"][2] < 300  # the astronaut's face
    assert abs(records["astronaut.jpg"]["faces"][0]["age"] - records["gray.png"]["faces"][0]["age"]) < 10
    reasons = {"trunc.jpg": "truncated", "empty.jpg": "empty", "notes.png": "not an image", "wall.jpg": "no face", "missing.jpg": "not found"}
    for name, words in reasons.items():
        assert words in records[name]["error"]
        assert any(name in line and words in line for line in err.splitlines())
    assert os.path.isfile(out / "astronaut.jpg") and os.path.isfile(out / "contact_sheet.png")
    code, _, _ = run(demo.main, [str(folder / "astronaut.jpg"), "--out", str(out)], capsys)
    assert code == 0
    # --unsure-below: 1 marks every gender unsure, 0 none; the JSON keeps the gender and its probability
    for below, unsure in (("1", True), ("0", False)):
        code, _, _ = run(demo.main, [str(folder / "astronaut.jpg"), "--no-draw", "--json", str(js), "--unsure-below", below], capsys)
        face = json.loads(js.read_text())[0]["faces"][0]
        assert code == 0 and face["gender_unsure"] is unsure and face["gender"] == records["astronaut.jpg"]["faces"][0]["gender"]
    code, _, err = run(demo.main, [str(folder / "astronaut.jpg"), "--unsure-below", "1.5"], capsys)
    assert code == 2 and "--unsure-below" in err and "Traceback" not in err
    os.makedirs(tmp_path / "void")
    code, _, err = run(demo.main, [str(tmp_path / "void"), "--out", str(out)], capsys)
    assert code == 1 and "folder has no images" in err


def test_demo_reads_ages_as_the_released_model_was_calibrated_unless_told(tmp_path, capsys):
    """The released model shows the median of each age distribution (calibrate.py chose it on validation);
    --age-estimate mean shows the mean of the same distribution."""
    photo = os.path.join(config.ROOT, "images", "grace_hopper.jpg")
    ages = {}
    for estimate in ("", "median", "mean"):
        js = tmp_path / f"{estimate or 'default'}.json"
        args = [photo, "--no-draw", "--json", str(js)] + (["--age-estimate", estimate] if estimate else [])
        assert run(demo.main, args, capsys)[0] == 0
        ages[estimate] = json.loads(js.read_text())[0]["faces"][0]["age"]
    assert ages[""] == ages["median"] and ages["median"] != ages["mean"]
    assert run(demo.main, [photo, "--no-draw", "--age-estimate", "mode"], capsys)[0] == 2  # argparse refuses it


def test_demo_finds_all_30_faces_of_a_group(tmp_path, capsys):
    rows = utk_rows("test", 30, seed=7)
    canvas = np.full((5 * 260 + 40, 6 * 240 + 40, 3), 180, np.uint8)
    for k, r in enumerate(rows):
        y, x = 40 + (k // 6) * 260, 40 + (k % 6) * 240
        canvas[y : y + 200, x : x + 200] = read_image(os.path.join(UTK, r["file"]))
    Image.fromarray(canvas).save(tmp_path / "group.jpg")
    code, _, _ = run(demo.main, [str(tmp_path / "group.jpg"), "--out", str(tmp_path / "o"), "--json", str(tmp_path / "g.json")], capsys)
    assert code == 0
    assert len(json.loads((tmp_path / "g.json").read_text())[0]["faces"]) == 30


def test_demo_refuses_a_decompression_bomb(tmp_path, capsys):
    from test_images_align import _png_header

    (tmp_path / "huge.png").write_bytes(_png_header(20000, 20000))
    code, _, err = run(demo.main, [str(tmp_path / "huge.png"), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "huge.png" in err and "too large" in err


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"junk")
    code, _, err = run(demo.main, ["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "x.pt" in err and len(err.strip().splitlines()) == 1


def test_onnx_matches_pytorch(tmp_path):
    net, _ = load_checkpoint(config.RELEASED_MODEL)
    path = export(net, str(tmp_path / "m.onnx"))
    assert max_difference(net, path, batch=5) <= 1e-4


def _constant_checkpoint(path):
    """A model that always says: male (p=0.8), age 30 (then 31, 29, 32, 28 as top-5)."""
    net = AgeGenderNet("mobilenet_v2", dropout=0.0)
    with torch.no_grad():
        for head in (net.gender_head, net.age_head):
            head.weight.zero_()
            head.bias.zero_()
        net.gender_head.bias[1] = float(np.log(4.0))
        for age, logit in ((30, 60.0), (31, 45.0), (29, 40.0), (32, 35.0), (28, 30.0)):
            net.age_head.bias[age] = logit
    torch.save({"model": net.state_dict(), "config": {"arch": "mobilenet_v2", "dropout": 0.0}}, path)


def test_evaluate_gives_hand_checkable_numbers(tmp_path, utk_cache, capsys):
    _constant_checkpoint(tmp_path / "const.pt")
    faces = np.load(os.path.join(utk_cache, "faces.npy"))[:4]
    os.makedirs(tmp_path / "crops")
    truth = [(20, 1, "0"), (30, 1, "1"), (40, 0, "0"), (33, 1, "2")]
    rows = []
    for k, (face, (age, gender, race)) in enumerate(zip(faces, truth)):
        Image.fromarray(face).save(tmp_path / "crops" / f"{k}.png")
        rows.append(dict(file=f"{k}.png", age=age, gender=gender, race=race))
    labels = write_csv(rows, tmp_path / "l.csv", cols=("file", "age", "gender", "race"))
    code, out, _ = run(evaluate.main, ["--checkpoint", str(tmp_path / "const.pt"), "--labels", labels, "--root", str(tmp_path / "crops"),
                                       "--json", str(tmp_path / "e.json"), "--plots", str(tmp_path / "plots")], capsys)
    assert code == 0
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["n"] == r["faces_found"] == 4
    assert r["gender_acc"] == 0.75
    assert r["age_mae"] == pytest.approx((10 + 0 + 10 + 3) / 4, abs=1e-3)
    assert r["age_cs5"] == 0.5 and r["age_top1"] == 0.25 and r["age_top5"] == 0.25
    assert r["by"]["gender"]["F"]["n"] == 1 and r["by"]["gender"]["F"]["gender_acc"] == 0.0
    assert r["by"]["race"]["White"]["age_mae"] == pytest.approx(10, abs=1e-3)
    assert r["by"]["age_group"]["30-39"]["n"] == 2
    # everyone read as 30: right for the two in their 30s, wrong for 20 and 40; balanced over the 3 groups present
    assert r["age_group_acc"] == 0.5 and r["age_group_acc_balanced"] == pytest.approx(1 / 3, abs=1e-4)
    assert r["age_bias"] == pytest.approx((10 + 0 - 10 - 3) / 4, abs=1e-3)
    assert r["by"]["age_group"]["40-49"]["age_group_acc"] == 0.0 and r["by"]["age_group"]["40-49"]["age_bias"] == pytest.approx(-10, abs=1e-3)
    assert os.path.isfile(tmp_path / "plots" / "mae_by_age.png") and os.path.isfile(tmp_path / "plots" / "pred_vs_true.png")


def test_evaluate_detect_on_shrunken_photos(tmp_path, capsys):
    rows = utk_rows("test", 12, seed=11)
    labels = write_csv(rows, tmp_path / "l.csv", cols=("file", "age", "gender"))
    common = ["--labels", labels, "--root", UTK, "--detect", "--pad-fraction", "0.25"]
    code, _, _ = run(evaluate.main, common + ["--downscale", "0.3", "--json", str(tmp_path / "small.json")], capsys)
    assert code == 0
    small = json.loads((tmp_path / "small.json").read_text())
    assert small["downscale"] == 0.3 and small["n"] == 12 and 8 <= small["faces_found"] <= 12
    # faces about 35 pixels tall are harder, but the released model must still beat a coin and a constant guess
    assert small["gender_acc"] > 0.6 and small["age_mae"] < 15
    for bad in (["--downscale", "0"], ["--downscale", "2"]):
        code, _, err = run(evaluate.main, common + bad, capsys)
        assert code == 2 and "--downscale" in err and len(err.strip().splitlines()) == 1


def test_demo_json_and_csv_give_both_ages_of_a_two_age_model_and_one_of_a_one_age_model(tmp_path, two_age_release, one_age_release,
                                                                                       capsys):
    photo = os.path.join(config.ROOT, "images", "astronaut.jpg")
    for name, checkpoint in (("two", two_age_release), ("one", one_age_release)):
        js, table = tmp_path / f"{name}.json", tmp_path / f"{name}.csv"
        code, _, _ = run(demo.main, [photo, "--no-draw", "--checkpoint", checkpoint, "--json", str(js), "--csv", str(table)], capsys)
        assert code == 0
        (face,) = json.load(open(js))[0]["faces"]
        (row,) = list(csv.DictReader(open(table)))
        if name == "two":  # its apparent-age head is its age head moved up five years
            assert 3 < face["apparent_age"] - face["age"] < 7 and face["apparent_age_std"] > 0
            assert float(row["apparent_age"]) == face["apparent_age"]
        else:  # one age output: no apparent age, never invented
            assert "apparent_age" not in face and row["apparent_age"] == ""
