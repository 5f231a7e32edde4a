"""Shared fixtures: real UTKFace data from ../shared, and a small real cache built once per session."""
import argparse
import csv
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402

UTK = os.path.join(config.SHARED_DATA, "utkface")
WIKI_MAT = os.path.join(config.SHARED_DATA, "imdb-wiki", "wiki.mat")


def utk_rows(split, n, seed=0):
    """n real UTKFace rows of one split, spread over the ages (seeded)."""
    with open(os.path.join(UTK, "labels.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split and int(r["age"]) <= 100]
    rng = np.random.default_rng(seed)
    return [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]


def run_main(main, args, capsys):
    """A script's main(args) as the shell would see it: exit code, stdout, stderr."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_csv(rows, path, cols=("file", "age", "gender", "race", "split")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="session")
def utk_cache(tmp_path_factory):
    """A cache of ~200 real UTKFace faces (140 train, 30 val, 30 test) made by pre_process.py."""
    import pre_process

    tmp = tmp_path_factory.mktemp("utk")
    rows = utk_rows("train", 140) + utk_rows("val", 30) + utk_rows("test", 30)
    labels = write_csv(rows, tmp / "labels.csv")
    out = tmp / "cache"
    assert pre_process.main(["--dataset", "csv", "--labels", labels, "--data-dir", UTK, "--out", str(out), "--workers", "2"]) == 0
    return str(out)


def parser_of(main, argv=("--help",)):
    """The ArgumentParser a script's main builds (caught as it parses)."""
    class Caught(Exception):
        pass

    seen = []
    real = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        seen.append(self)
        raise Caught

    argparse.ArgumentParser.parse_args = catch
    try:
        main(list(argv))
    except Caught:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return seen[0]
