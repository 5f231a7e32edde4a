"""calibrate.py: what it fits and stores, and that the demo follows it."""
import json

import numpy as np
import pytest
import torch

import config
import evaluate
from conftest import run_main
from data_gen import FaceCache, make_loader
from metrics import median_age, predicted_age
from predictor import AgeGenderPredictor


def test_calibrate_stores_the_views_it_was_fitted_for(clap_cache, tmp_path, capsys):
    """calibrate.py writes the fit with its test-time views; they become the checkpoint's default views."""
    import calibrate

    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    code, out, _ = run_main(calibrate.main, ["--checkpoint", config.RELEASED_MODEL, "--cache", clap_cache, "--no-tta", "--second-look", "0.8",
                                             "--out", one], capsys)
    assert code == 0 and "wrote the calibration" in out
    ckpt = torch.load(one, map_location="cpu", weights_only=True)
    assert ckpt["tta"] is False and ckpt["calibration"]["age_std_scale"] > 0 and ckpt["gender_second_look_below"] == 0.8
    assert AgeGenderPredictor(one, "cpu").tta is False and AgeGenderPredictor(one, "cpu").second_look == 0.8
    assert AgeGenderPredictor(one, "cpu", second_look=0).second_look == 0  # what the caller asks for comes first
    assert run_main(calibrate.main, ["--checkpoint", one, "--cache", clap_cache, "--tta", "--tta-zoom", "1.0", "--out", two], capsys)[0] == 0
    stored = AgeGenderPredictor(two, "cpu")
    assert stored.tta is True and not stored.net.zoom_view  # the mirror pass only, as fitted
    assert AgeGenderPredictor(two, "cpu", tta=False).tta is False  # what the caller asks for comes first


def test_calibrate_chooses_the_age_estimate_and_the_demo_follows_it(clap_cache, tmp_path, capsys):
    """calibrate.py stores the estimate it chose (or was told); the predictor, evaluate.py and the tracker read
    ages off the distribution with it, and an explicit choice comes first."""
    import calibrate
    from tracker import FaceTracker

    median_ckpt = str(tmp_path / "median.pt")
    code, out, _ = run_main(calibrate.main, ["--checkpoint", config.RELEASED_MODEL, "--cache", clap_cache, "--age-estimate", "median",
                                             "--out", median_ckpt], capsys)
    assert code == 0 and "ages shown as the median" in out and "mean " in out
    assert torch.load(median_ckpt, map_location="cpu", weights_only=True)["age_estimate"] == "median"
    x = next(iter(make_loader(FaceCache(clap_cache, split="val"), 16, workers=0)[0]))[0]
    by_median = AgeGenderPredictor(median_ckpt, "cpu", runtime="torch")
    by_mean = AgeGenderPredictor(median_ckpt, "cpu", runtime="torch", age_estimate="mean")
    assert by_median.age_estimate == "median" and by_mean.age_estimate == "mean"
    a, b = by_median.predict_tensor(x), by_mean.predict_tensor(x)
    assert np.allclose(a["age_prob"], b["age_prob"]) and np.allclose(a["age_std"], b["age_std"])
    assert np.allclose(a["age"], median_age(a["age_prob"]), atol=1e-3) and np.allclose(b["age"], predicted_age(b["age_prob"]), atol=1e-3)
    assert np.abs(a["age"] - b["age"]).max() > 0.05  # really another number
    with pytest.raises(ValueError, match="unknown age estimate"):
        AgeGenderPredictor(median_ckpt, "cpu", age_estimate="mode")
    # evaluate.py scores the same estimate, and says which
    report = str(tmp_path / "eval.json")
    assert run_main(evaluate.main, ["--checkpoint", median_ckpt, "--cache", clap_cache, "--split", "val", "--json", report], capsys)[0] == 0
    with open(report) as f:
        r = json.load(f)
    ds = FaceCache(clap_cache, split="val")
    got = by_median.predict_tensor(next(iter(make_loader(ds, len(ds), workers=0)[0]))[0])
    scored = "apparent_age" if ds.age_kind == "apparent" else "age"  # CLAP2016's apparent ages: the apparent output
    assert r["age_output"] == scored and ds.age_kind == "apparent"
    assert r["age_estimate"] == "median" and r["age_mae"] == pytest.approx(np.abs(got[scored] - ds.ages.numpy()).mean(), abs=1e-3)
    # a track's averaged distribution is read the same way
    face = {"box": [0, 0, 50, 60], "landmarks": [[10, 20]] * 5, "score": 1.0, "gender": "F", "gender_prob": 0.9,
            "age_distribution": list(a["age_prob"][0])}
    for estimate in ("mean", "median"):
        tracker = FaceTracker(age_estimate=estimate)
        track = tracker.tracks[tracker.update(0, [face])[0]]
        assert track.summary()["age"] == pytest.approx(predicted_age(a["age_prob"][:1], estimate)[0], abs=0.06)


def test_calibrate_unsure_only_keeps_the_calibration(clap_cache, tmp_path, capsys):
    """--unsure-only adds the fitted gender-unsure threshold and changes nothing else of the checkpoint."""
    import calibrate

    out = str(tmp_path / "u.pt")
    code, stdout, _ = run_main(calibrate.main, ["--checkpoint", config.RELEASED_MODEL, "--cache", clap_cache, "--unsure-only",
                                                "--unsure-accuracy", "0.99", "--out", out], capsys)
    assert code == 0 and "gender_unsure_below" in stdout
    before = torch.load(config.RELEASED_MODEL, map_location="cpu", weights_only=True)
    after = torch.load(out, map_location="cpu", weights_only=True)
    for k in ("age_std_scale", "gender_temperature"):
        assert after["calibration"][k] == before["calibration"][k]
    assert 0.5 <= after["calibration"]["gender_unsure_below"] <= 0.99 and after["age_estimate"] == before["age_estimate"]
    assert all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    assert AgeGenderPredictor(out, "cpu").unsure_below == after["calibration"]["gender_unsure_below"]
