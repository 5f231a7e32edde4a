"""The cache built from ~200 real UTKFace photos, served by data_gen."""
import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import pre_process
from conftest import UTK, utk_rows, write_csv
from data_gen import CacheError, EpochBatchSampler, FaceCache, make_loader


def test_cache_layout(utk_cache):
    faces = np.load(os.path.join(utk_cache, "faces.npy"), mmap_mode="r")
    with open(os.path.join(utk_cache, "meta.csv")) as f:
        meta = list(csv.DictReader(f))
    assert faces.shape[1:] == (112, 96, 3) and faces.dtype == np.uint8
    assert len(meta) == len(faces) >= 190  # MTCNN misses a few tight crops at most
    assert np.load(os.path.join(utk_cache, "landmarks.npy")).shape == (len(faces), 5, 2)
    with open(os.path.join(utk_cache, "rejects.csv")) as f:
        assert len(list(csv.DictReader(f))) == 200 - len(meta)
    assert faces[:, 40:80, 30:70].std() > 20  # real faces, not blank crops


def test_rerun_resumes_and_bad_images_are_rejected(tmp_path, capsys):
    rows = utk_rows("val", 6, seed=5)
    root = tmp_path / "photos"
    for r in rows:
        os.makedirs(root / os.path.dirname(r["file"]), exist_ok=True)
        shutil.copy(os.path.join(UTK, r["file"]), root / r["file"])
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "text.jpg").write_text("hello")
    bad = [dict(file="images/empty.jpg", age=30, gender=1, split="train"), dict(file="images/text.jpg", age=30, gender=1, split="train"),
           dict(file="images/missing.jpg", age=30, gender=1, split="train")]
    labels = write_csv(rows + bad, tmp_path / "labels.csv")
    args = ["--dataset", "csv", "--labels", labels, "--data-dir", str(root), "--out", str(tmp_path / "c"), "--workers", "1"]
    assert pre_process.main(args) == 0
    with open(tmp_path / "c" / "rejects.csv") as f:
        reasons = {r["file"]: r["reason"] for r in csv.DictReader(f)}
    assert reasons["images/empty.jpg"].startswith("empty file") and reasons["images/text.jpg"].startswith("not an image")
    assert reasons["images/missing.jpg"] == "file not found"
    first = np.load(tmp_path / "c" / "faces.npy")
    capsys.readouterr()
    assert pre_process.main(args) == 0
    assert "resuming: 9 of 9 already done" in capsys.readouterr().out
    assert np.array_equal(first, np.load(tmp_path / "c" / "faces.npy"))


def test_dataset_serves_normalised_tensors(utk_cache):
    ds = FaceCache(utk_cache, split="val")
    x, age, gender = ds[0]
    assert x.shape == (3, 112, 96) and x.dtype == torch.float32
    assert 0 <= age <= 100 and gender in (0, 1)
    raw = np.load(os.path.join(utk_cache, "faces.npy"))[ds.indices[0]].astype(np.float64) / 255
    expected = (raw - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(x.numpy(), expected.transpose(2, 0, 1), atol=1e-5)


def test_augmentation_is_seeded_and_changes_pixels(utk_cache):
    ds = FaceCache(utk_cache, split="train", train=True)
    loader, sampler = make_loader(ds, 16, seed=3, workers=0)
    sampler.set_epoch(0)
    a = next(iter(loader))
    b = next(iter(loader))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same epoch, same batch, same pixels
    plain = FaceCache(utk_cache, split="train")
    idx = list(sampler)[0]
    assert not torch.allclose(a[0], plain.__getitems__(idx)[0], atol=0.1)
    sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], a[1])  # another epoch, another order
    assert a[0].abs().max() < 6  # normalised, not 0..255


def test_augmentation_scale_range_is_honoured():
    """A white disc in the middle of each face: at scale 2 its area is 4 times that at scale 1."""
    from data_gen import augment

    raw = np.zeros((64, 112, 96, 3), np.uint8)
    cv2.circle(raw[0], (48, 56), 12, (255, 255, 255), -1)
    raw[:] = raw[0]
    areas = {}
    for s in (1.0, 2.0):
        x = augment(raw, np.random.default_rng(0), scale_range=(s, s)).numpy()
        bright = x.mean(1) > x.mean((1, 2, 3))[:, None, None]  # above each face's own mean: colour jitter aside
        areas[s] = np.median(bright.sum((1, 2)))
    assert areas[1.0] == pytest.approx(np.pi * 12**2, rel=0.15)
    assert areas[2.0] / areas[1.0] == pytest.approx(4.0, rel=0.15)


def test_loader_with_workers_matches_in_process(utk_cache):
    ds = FaceCache(utk_cache, split="train", train=True)
    l0, s0 = make_loader(ds, 32, seed=1, workers=0)
    l2, s2 = make_loader(ds, 32, seed=1, workers=2)
    for x0, x2 in zip(l0, l2):
        assert torch.equal(x0[0], x2[0])


def test_sampler_splits_ranks_and_resumes():
    full = [list(b) for b in EpochBatchSampler(100, 10, seed=0)]
    r0 = EpochBatchSampler(100, 10, seed=0, rank=0, world_size=2)
    r1 = EpochBatchSampler(100, 10, seed=0, rank=1, world_size=2)
    a, b = sum((list(x) for x in r0), []), sum((list(x) for x in r1), [])
    assert len(a) == len(b) == 50 and not set(a) & set(b)
    s = EpochBatchSampler(100, 10, seed=0)
    s.set_epoch(0, start_batch=4)
    assert [list(x) for x in s] == full[4:]


def test_bad_caches(tmp_path, utk_cache):
    with pytest.raises(CacheError, match="run pre_process.py"):
        FaceCache(str(tmp_path))
    other = tmp_path / "other"
    shutil.copytree(utk_cache, other)
    info = json.loads((other / "cache.json").read_text())
    info["image_h"], info["image_w"] = 128, 128
    (other / "cache.json").write_text(json.dumps(info))
    with pytest.raises(CacheError, match="128x128"):
        FaceCache(str(other))
    with pytest.raises(CacheError, match="no faces in split"):
        FaceCache(utk_cache, split="nope")
