"""release.py and recipes/release.sh: weight soups, slim releases, the whole release chain."""
import os
import re
import subprocess
import sys

import pytest
import torch

import config
import pre_process
from conftest import UTK, utk_rows, write_csv
from models import AgeGenderNet, load_checkpoint


def _tiny_cache(tmp_path, name, split_rows, age_kind="real"):
    labels = write_csv(split_rows, tmp_path / f"{name}.csv")
    out = tmp_path / name
    assert pre_process.main(["--dataset", "csv", "--labels", labels, "--data-dir", UTK, "--out", str(out), "--workers", "1",
                             "--pad-fraction", "0.25", "--age-kind", age_kind]) == 0
    return str(out)


@pytest.mark.slow
def test_release_chain_runs_end_to_end(tmp_path):
    """Every stage of recipes/release.sh, one epoch of a few batches each, on four tiny caches of real
    faces; then the result is a calibrated two-age release that the demo's predictor loads."""
    caches = [_tiny_cache(tmp_path, name, utk_rows("train", 16, seed=k) + utk_rows("val", 4, seed=k), kind)
              for k, (name, kind) in enumerate((("utk", "real"), ("clap", "apparent"), ("aaf", "real"), ("fair", "apparent")))]
    out = tmp_path / "chain"
    env = {**os.environ, "QUICK": "1", "UTK": caches[0], "CLAP": caches[1], "AAF": caches[2], "FAIR": caches[3], "OUT": str(out),
           "PYTHON": sys.executable}
    run = subprocess.run(["bash", os.path.join(config.ROOT, "recipes", "release.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    recipe = re.findall(r"^train (\S+)", open(os.path.join(config.ROOT, "recipes", "release.sh")).read(), re.M)
    stages = re.findall(r"^== stage (\S+)", run.stdout, re.M)
    assert stages == recipe and len(stages) >= 10  # every stage the recipe names ran, in its order
    ckpt = torch.load(out / "release.pt", map_location="cpu", weights_only=True)
    assert {"age_std_scale", "gender_temperature", "gender_unsure_below"} <= set(ckpt["calibration"])
    assert len(ckpt["calibration"]["fitted_on"]) == 4 and ckpt["age_estimate"] == "median" and ckpt["gender_second_look_below"] == 0.9
    assert ckpt["soup_weights"] == [0.5, 0.25, 0.25] and ckpt["averaged_from"][0].endswith(os.path.join("ff71", "best.pt"))
    assert "apparent_head.weight" in ckpt["model"] and "apparent_age_std_scale" in ckpt["calibration"]
    nb52 = torch.load(out / "kd_nb52" / "best.pt", map_location="cpu", weights_only=True)
    assert len(nb52["config"]["teacher"]) == 3 and nb52["config"]["teacher_view"] == "clean"  # three teachers, the clean view
    last = torch.load(out / "ff62" / "best.pt", map_location="cpu", weights_only=True)
    assert list(last["config"]["cache"]) == caches and last["config"]["two_ages"]  # four sources, two ages
    assert list(last["config"]["balance"]) == [0, 0, 0, 0.5] and last["config"]["neighbour_aug"] == 0.2
    ff68 = torch.load(out / "ff68" / "best.pt", map_location="cpu", weights_only=True)["config"]
    assert list(ff68["teacher_sources"]) == caches[:2] and list(ff68["balance"]) == [0, 0, 0, 1]  # held to row 63 on two sources
    ff71 = torch.load(out / "ff71" / "best.pt", map_location="cpu", weights_only=True)["config"]
    assert list(ff71["source_weights"]) == [0.2, 0.35, 0.15, 0.3] and not ff71["teacher"]
    # a second run resumes: every stage is found finished, nothing is trained again
    again = subprocess.run(["bash", os.path.join(config.ROOT, "recipes", "release.sh")], env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0 and again.stdout.count("already complete") == len(recipe), again.stdout[-2000:]
    from predictor import AgeGenderPredictor

    faces = AgeGenderPredictor(str(out / "release.pt"), "cpu")(os.path.join(config.ROOT, "images", "astronaut.jpg"))
    assert len(faces) == 1


def test_release_averages_the_weights_of_several_checkpoints(tmp_path, capsys):
    import release
    from conftest import run_main

    paths, states = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = AgeGenderNet("sface").state_dict()
        paths.append(str(tmp_path / f"run{seed}.pt"))
        torch.save({"model": state, "config": {"arch": "sface", "dropout": 0.0}, "tta": False}, paths[-1])
        states.append(state)
    soup = str(tmp_path / "soup.pt")
    code, out, err = run_main(release.main, ["--checkpoint", *paths, "--out", soup], capsys)
    assert code == 0, err
    net, ckpt = load_checkpoint(soup)
    key = "gender_head.weight"
    assert torch.allclose(net.state_dict()[key], ((states[0][key] + states[1][key]) / 2).half().float())
    assert ckpt["tta"] is False and ckpt["averaged_from"] == [os.path.abspath(p) for p in paths]  # outside the repo
    assert release._repo_relative(os.path.join(config.ROOT, "checkpoints", "a", "best.pt")) == os.path.join("checkpoints", "a", "best.pt")

    # a soup that leans to one side: 3 : 1 is 0.75 / 0.25 of each weight, and the shares are recorded
    code, out, err = run_main(release.main, ["--checkpoint", *paths, "--soup-weights", "3", "1", "--out", soup], capsys)
    assert code == 0, err
    net, ckpt = load_checkpoint(soup)
    assert torch.allclose(net.state_dict()[key], (0.75 * states[0][key] + 0.25 * states[1][key]).half().float())
    assert ckpt["soup_weights"] == [0.75, 0.25]
    for bad in (["1"], ["1", "0"]):  # a count that does not match, a share that is not positive: one line, exit 2
        code, out, err = run_main(release.main, ["--checkpoint", *paths, "--soup-weights", *bad, "--out", soup], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "soup" in err, err

    torch.save({"model": AgeGenderNet("mobilenet_v2").state_dict(), "config": {"arch": "mobilenet_v2"}}, tmp_path / "other.pt")
    code, out, err = run_main(release.main, ["--checkpoint", paths[0], str(tmp_path / "other.pt"), "--out", soup], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "other.pt" in err and "cannot be averaged" in err
