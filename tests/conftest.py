"""Shared fixtures: real UTKFace data from ../shared, and a small real cache built once per session."""
import argparse
import csv
import datetime
import os
import struct
import sys
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402

UTK = os.path.join(config.SHARED_DATA, "utkface")
WIKI_MAT = os.path.join(config.SHARED_DATA, "imdb-wiki", "wiki.mat")


# what a test needs ../shared/data for: these fixtures, or these names in its own code
SHARED_FIXTURES = {"utk_cache", "range_cache", "two_age_checkpoint", "clap_cache"}
SHARED_NAMES = ("UTK", "CLAP", "WIKI_MAT", "utk_rows", "SHARED_DATA")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains for a minute or more (the quick run leaves these out: -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    """Without ../shared/data (a fresh clone on its own), the tests that read it are skipped with one reason;
    under CI=true, where it is always there, a missing folder fails them instead. A test reads it where its
    own code, a fixture it uses or a helper of its module that either calls names it (SHARED_NAMES,
    SHARED_FIXTURES)."""
    import config as project

    if os.path.isdir(os.path.join(project.SHARED_DATA, "utkface")) or os.environ.get("CI") == "true":
        return  # in CI the tests run, and fail where the data is missing
    reason = f"needs the shared data in {project.SHARED_DATA} (UTKFace, CLAP2016, wiki.mat), which is not here"
    for item in items:
        if SHARED_FIXTURES & set(getattr(item, "fixturenames", ())) or any(name in _code_of(item) for name in SHARED_NAMES):
            item.add_marker(pytest.mark.skip(reason=reason))


def _code_of(item):
    """The source of a test, of the fixtures it uses and of the functions of its module those call, recursively."""
    import inspect

    if not hasattr(item, "function"):
        return ""
    module = vars(inspect.getmodule(item.function))
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    todo = [item.function] + [d[-1].func for name, d in defs.items() if name in item.fixturenames and d]
    seen, sources = set(), []
    while todo:
        fn = inspect.unwrap(todo.pop())
        if fn in seen or not inspect.isfunction(fn):
            continue
        seen.add(fn)
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        sources.append(source)
        todo += [module[name] for name in fn.__code__.co_names if inspect.isfunction(module.get(name))]
    return "\n".join(sources)


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


@pytest.fixture(scope="session")
def range_cache(tmp_path_factory):
    """A cache of ~160 real UTKFace faces labelled as FairFace labels them: an apparent age group (age_min,
    age_max) instead of an age, and the ethnic group by name; made by pre_process.py --dataset fairface."""
    import pre_process

    tmp = tmp_path_factory.mktemp("ranges")
    rows = []
    for r in utk_rows("train", 80, seed=1) + utk_rows("val", 80, seed=1):
        lo, hi = next(g for g in config.AGE_GROUPS if g[0] <= int(r["age"]) <= g[1])
        rows.append({**r, "age_group": f"{lo}-{hi}" if hi < 200 else f"{lo}+", "age_min": lo, "age_max": min(hi, 100),
                     "race": "Black" if r["race"] in ("1", "3") else "White"})
    labels = write_csv(rows, tmp / "labels.csv", cols=("file", "age_group", "age_min", "age_max", "gender", "race", "split"))
    out = tmp / "fairface_like"
    assert pre_process.main(["--dataset", "fairface", "--labels", labels, "--data-dir", UTK, "--out", str(out), "--workers", "2"]) == 0
    return str(out)


@pytest.fixture(scope="session")
def two_age_checkpoint(utk_cache, range_cache, tmp_path_factory):
    """A small two-age network trained for a few steps on real ages (utk_cache) and age groups (range_cache)."""
    import train

    out = tmp_path_factory.mktemp("two_ages")
    args = ["--cache", utk_cache, range_cache, "--out-dir", str(out), "--arch", "resnet18", "--pretrained", "", "--batch-size", "16",
            "--workers", "0", "--epochs", "1", "--no-eval-tta"]
    assert train.main(args) == 0
    return str(out / "best.pt")


@pytest.fixture(scope="session")
def two_age_release(tmp_path_factory):
    """The released model with an apparent-age head that is its age head moved up five years (its apparent
    age reads every face about five years older than its age): a two-age checkpoint that finds and reads
    real faces, for the demo, the API and the page."""
    import torch

    ckpt = torch.load(config.RELEASED_MODEL, map_location="cpu", weights_only=True)
    state = {k: v.float() for k, v in ckpt["model"].items()}
    state["apparent_head.weight"] = state["age_head.weight"].roll(5, 0)
    state["apparent_head.bias"] = state["age_head.bias"].roll(5, 0)
    ckpt["model"] = state
    path = tmp_path_factory.mktemp("two_age_release") / "two_ages.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="session")
def one_age_release(tmp_path_factory):
    """The released model without its apparent-age head: a checkpoint as they were made before two ages."""
    import torch

    ckpt = torch.load(config.RELEASED_MODEL, map_location="cpu", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("apparent_head.")}
    ckpt["calibration"] = {k: v for k, v in ckpt["calibration"].items() if k != "apparent_age_std_scale"}
    path = tmp_path_factory.mktemp("one_age_release") / "one_age.pt"
    torch.save(ckpt, path)
    return str(path)


CLAP = os.path.join(config.SHARED_DATA, "clap2016")


@pytest.fixture(scope="session")
def clap_cache(tmp_path_factory):
    """~60 real CLAP2016 photos (48 of its train split, 12 of its val split) through pre_process.py."""
    import pre_process

    tmp = tmp_path_factory.mktemp("clap")
    with open(os.path.join(CLAP, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    pick = [r for r in rows if r["split"] == "train"][:48] + [r for r in rows if r["split"] == "val"][:12]
    labels = write_csv(pick, tmp / "labels.csv", cols=("file", "age", "gender", "age_std", "split"))
    out = tmp / "cache"
    assert pre_process.main(["--dataset", "clap2016", "--labels", labels, "--data-dir", CLAP, "--out", str(out),
                             "--pad-fraction", "0.1", "--clap-holdout", "0.25", "--workers", "2",
                             "--gender-labels", ""]) == 0  # kept without gender: the unknown-gender path
    return str(out)


ASTRONAUT = os.path.join(config.ROOT, "images", "astronaut.jpg")


def ordinal(y, m, d):
    """A date as a MATLAB datenum (IMDB-WIKI's dob)."""
    return datetime.date(y, m, d).toordinal() + 366


def png_header(width, height):
    """The first bytes of a PNG that claims width x height pixels: a decompression bomb's header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00\x00\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
