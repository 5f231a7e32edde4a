"""The README and docs/: links that resolve, quick-start commands that parse, and the release chain
(recipes/release.sh) running end to end on a few faces (plumbing, not accuracy)."""
import glob
import os
import re
import shlex
import subprocess
import sys

import torch

import config
import pre_process
from conftest import UTK, parser_of, utk_rows, write_csv

DOCS = [os.path.join(config.ROOT, "README.md")] + sorted(glob.glob(os.path.join(config.ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_points_at_a_file():
    assert len(DOCS) >= 8
    for page in DOCS:
        text = open(page).read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, config.ROOT)}: link to {target} points at nothing"


def readme_commands():
    """Every `python SCRIPT.py ...` line of the README's shell blocks, as (script, args)."""
    text = open(DOCS[0]).read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            if len(words) >= 2 and words[0] == "python" and words[1].endswith(".py"):
                yield words[1][:-3], words[2:]


def test_each_readme_command_parses():
    seen = set()
    for script, args in readme_commands():
        if script == "-m":
            continue
        module = __import__(script)
        parser = parser_of(module.main)
        try:
            parser.parse_args(args)
        except SystemExit as e:  # --help exits 0; anything else is a README that lies
            assert e.code == 0 and "--help" in args, f"README: python {script}.py {' '.join(args)}"
        seen.add(script)
    assert {"demo", "pre_process", "train", "evaluate", "calibrate", "bench", "serve"} <= seen


def _tiny_cache(tmp_path, name, split_rows, age_kind="real"):
    labels = write_csv(split_rows, tmp_path / f"{name}.csv")
    out = tmp_path / name
    assert pre_process.main(["--dataset", "csv", "--labels", labels, "--data-dir", UTK, "--out", str(out), "--workers", "1",
                             "--pad-fraction", "0.25", "--age-kind", age_kind]) == 0
    return str(out)


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
    assert len(ckpt["calibration"]["fitted_on"]) == 4 and ckpt["age_estimate"] == "median"
    assert ckpt["soup_weights"] == [0.5, 0.5] and ckpt["averaged_from"][0].endswith(os.path.join("ff62", "best.pt"))
    assert "apparent_head.weight" in ckpt["model"] and "apparent_age_std_scale" in ckpt["calibration"]
    nb52 = torch.load(out / "kd_nb52" / "best.pt", map_location="cpu", weights_only=True)
    assert len(nb52["config"]["teacher"]) == 3 and nb52["config"]["teacher_view"] == "clean"  # three teachers, the clean view
    last = torch.load(out / "ff62" / "best.pt", map_location="cpu", weights_only=True)
    assert list(last["config"]["cache"]) == caches and last["config"]["two_ages"]  # four sources, two ages
    assert list(last["config"]["balance"]) == [0, 0, 0, 0.5] and last["config"]["neighbour_aug"] == 0.2
    # a second run resumes: every stage is found finished, nothing is trained again
    again = subprocess.run(["bash", os.path.join(config.ROOT, "recipes", "release.sh")], env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0 and again.stdout.count("already complete") == len(recipe), again.stdout[-2000:]
    from predictor import AgeGenderPredictor

    faces = AgeGenderPredictor(str(out / "release.pt"), "cpu")(os.path.join(config.ROOT, "images", "astronaut.jpg"))
    assert len(faces) == 1
