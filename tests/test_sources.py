"""sources.py: each source's labels, gender labels, age formulas."""
import csv
import os

import numpy as np

import pre_process
import sources
from conftest import CLAP, ordinal, run_main, write_csv

GENDER_LABELS = sources.GENDER_LABELS["clap2016"]


def test_age_formula():
    assert sources.age_at_photo(ordinal(1981, 5, 5), 2009) == 28
    assert sources.age_at_photo(ordinal(1981, 7, 1), 2009) == 27
    assert sources.age_at_photo(0, 2009) is None
    assert sources.age_at_photo(np.inf, 2009) is None


def test_shipped_gender_labels_cover_every_clap2016_photo():
    with open(os.path.join(CLAP, "labels.csv"), newline="") as f:
        files = [r["file"] for r in csv.DictReader(f)]
    with open(GENDER_LABELS, newline="") as f:
        labels = {r["file"]: r["gender"] for r in csv.DictReader(f)}
    assert set(labels) == set(files) and set(labels.values()) <= {"0", "1", ""}
    known = [g for g in labels.values() if g]
    assert len(known) > 0.85 * len(files)  # unsure (mostly infants and toddlers) left empty: 499 of 5,611
    assert 0.45 < known.count("1") / len(known) < 0.55


def test_gender_labels_fill_in_unknown_genders_only(tmp_path, capsys):
    with open(os.path.join(CLAP, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:40]
    shipped = sources.read_gender_labels(GENDER_LABELS)
    first = rows[0]["file"]
    rows[0]["gender"] = str(1 - shipped[first])  # a source's own gender wins over the annotation
    labels = write_csv(rows, tmp_path / "labels.csv", cols=("file", "age", "gender", "age_std", "split"))
    common = ["--dataset", "clap2016", "--labels", labels, "--data-dir", CLAP, "--metadata-only"]
    assert run_main(pre_process.main, common + ["--out", str(tmp_path / "auto")], capsys)[0] == 0
    with open(tmp_path / "auto" / "meta.csv", newline="") as f:
        meta = {r["file"]: int(r["gender"]) for r in csv.DictReader(f)}
    assert meta[first] == 1 - shipped[first]
    assert all(meta[r["file"]] == shipped.get(r["file"], sources.UNKNOWN_GENDER) for r in rows[1:])
    assert -1 in meta.values() and {0, 1} <= set(meta.values())  # the annotator was unsure of a few (-1)

    # a broken gender file: one line naming the file and the line, exit 2, before any photo is opened
    bad = tmp_path / "bad.csv"
    bad.write_text("file,gender\nimages/img0000000.jpg,1\nimages/img0000001.jpg,male\n")
    code, _, err = run_main(pre_process.main, common + ["--out", str(tmp_path / "b"), "--gender-labels", str(bad)], capsys)
    assert code == 2 and "bad.csv: line 3" in err and "male" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(pre_process.main, common + ["--out", str(tmp_path / "b"), "--gender-labels", str(tmp_path / "no.csv")], capsys)
    assert code == 2 and "no.csv" in err and "not found" in err


def test_evaluate_reads_gender_labels_for_photos_without_gender(tmp_path):
    rows = [{"file": "a.jpg", "age": "30", "gender": ""}, {"file": "b.jpg", "age": "40", "gender": "1"},
            {"file": "c.jpg", "age": "50", "gender": ""}]
    labels = write_csv(rows, tmp_path / "labels.csv", cols=("file", "age", "gender"))
    genders = tmp_path / "g.csv"
    genders.write_text("file,gender\na.jpg,0\nb.jpg,0\nc.jpg,\n")
    got = sources.read_labels(labels, "", str(genders))
    assert [(r["file"], r["gender"]) for r in got] == [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", -1)]
