"""demo.py: photos, folders and videos from the command line; bad input, JSON and CSV output."""
import csv
import json
import os
import shutil

import cv2
import numpy as np
from PIL import Image

import config
import demo
from conftest import ASTRONAUT, UTK, png_header, utk_rows
from conftest import run_main as run
from predictor import AgeGenderPredictor
from utils import read_image


def _photos(tmp_path):
    good = tmp_path / "in"
    os.makedirs(good)
    shutil.copy(os.path.join(config.ROOT, "images", "astronaut.jpg"), good / "astronaut.jpg")
    Image.open(good / "astronaut.jpg").convert("L").save(good / "gray.png")
    return good


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
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))
    code, _, err = run(demo.main, [str(tmp_path / "huge.png"), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "huge.png" in err and "too large" in err


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"junk")
    code, _, err = run(demo.main, ["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "x.pt" in err and len(err.strip().splitlines()) == 1


def test_bad_second_look_is_one_line(tmp_path, capsys):
    code, _, err = run(demo.main, [ASTRONAUT, "--second-look", "1.5", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--second-look 1.5" in err and len(err.strip().splitlines()) == 1


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
