"""probe.py: the figures of the study of whether the gender output leans on the group."""
import json

import numpy as np
import pytest

import probe
from conftest import run_main
from data_gen import FaceCache


def test_lean_and_separation_by_hand():
    # group A: women at -4 and -2 (mean -3), men at +5 (mean +5): lean +1, separation 4
    # group B: women at -1, men at +1 and +3 (mean +2): lean +0.5, separation 1.5
    margin = np.array([-4.0, -2.0, 5.0, -1.0, 1.0, 3.0, 9.0])
    sex = np.array([0, 0, 1, 0, 1, 1, 1])
    groups = np.array(["A", "A", "A", "B", "B", "B", ""])  # an unknown group is left out
    out = probe.lean_and_separation(margin, sex, groups)
    assert out == {"A": {"women": -3.0, "men": 5.0, "lean": 1.0, "separation": 4.0},
                   "B": {"women": -1.0, "men": 2.0, "lean": 0.5, "separation": 1.5}}


def test_variance_explained_by_hand():
    # two groups of two at means 1 and 3, each spread by 1: total variance 1 + 1 = 2, between 1
    values = np.array([0.0, 2.0, 2.0, 4.0])
    groups = np.array(["a", "a", "b", "b"])
    assert probe.variance_explained(values, groups) == pytest.approx(0.5)
    assert probe.variance_explained(np.array([1.0, 1.0]), np.array(["a", "b"])) == 0.0


def test_accuracy_by_typicality_by_hand():
    # six women of group A: the three least typical all wrong, the two most typical right; tertiles of 2
    right = np.array([0, 0, 1, 0, 1, 1], bool)
    own = np.array([0.1, 0.2, 0.5, 0.6, 0.8, 0.9])
    out = probe.accuracy_by_typicality(right, own, np.zeros(6, int), np.array(["A"] * 6))
    assert out == {"A F": [0.0, 0.5, 1.0]}


def _synthetic(n, leak, seed):
    """Faces of three groups in an 8-d feature: dims 0-1 say the group; the gender margin reads dim 2 (the sex)
    plus `leak` times the group's code, so only a leaking margin carries the group."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 3, n)
    sex = rng.integers(0, 2, n)
    centres = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    x = rng.normal(0, 1, (n, 8))
    x[:, :2] += centres[groups]
    x[:, 2] += np.where(sex == 1, 2.0, -2.0)
    margin = x[:, 2] + leak * (groups - 1) * 2.0
    return x, margin, sex, np.array(["G0", "G1", "G2"])[groups]


def test_the_margin_probe_finds_a_group_only_where_the_margin_carries_it():
    for leak, expect_above_chance in ((0.0, False), (1.5, True)):
        fit, mine = _synthetic(3000, leak, 0), _synthetic(1500, leak, 1)
        r = probe.study(mine[0], mine[1], mine[2], mine[3], *fit)
        p = r["probe_accuracy"]
        assert p["whole_feature"] > 0.9  # the feature says the group either way
        assert (p["margin_and_sex"] > p["largest_group"] + 0.15) == expect_above_chance, p
        lean = [m["lean"] for m in r["margin"].values()]
        assert (max(lean) - min(lean) > 3.0) == expect_above_chance  # the groups sit apart on the gender axis
        assert r["n"] == 1500 and set(r["by_group_sex"]) == {f"G{k} {s}" for k in range(3) for s in "FM"}


def test_probe_on_a_real_cache(utk_cache, tmp_path, capsys):
    out = tmp_path / "probe.json"
    code, text, _ = run_main(probe.main, ["--cache", utk_cache, "--json", str(out)], capsys)
    assert code == 0 and "lean" in text and "a probe names the group" in text
    r = json.loads(out.read_text())
    assert r["n"] == 30 and r["fit_faces"] == len(FaceCache(utk_cache, split="train")) and r["split"] == "val"
    assert sum(c["n"] for c in r["by_group_sex"].values()) == 30
    assert 0 <= r["probe_accuracy"]["margin_and_sex"] <= 1


def test_probe_needs_group_labels(clap_cache, capsys):
    code, _, err = run_main(probe.main, ["--cache", clap_cache], capsys)
    assert code == 2 and "no race column" in err and len(err.strip().splitlines()) == 1
