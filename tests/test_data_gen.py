"""data_gen.py: the cache served fast, augmented, mixed across sources and sampled as asked."""
import csv
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import config
import pre_process
from conftest import run_main, write_csv
from data_gen import CacheError, EpochBatchSampler, FaceCache, MixedFaces, augment, balance_repeats, make_loader


def test_turned_faces_are_drawn_more_often():
    sampler = EpochBatchSampler(10, 5, repeats=np.r_[np.ones(9, int), 5])
    counts = np.zeros(10)
    for epoch in range(100):
        sampler.set_epoch(epoch)
        for batch in sampler:
            np.add.at(counts, batch, 1)  # a batch may hold the same face twice
    assert 4 < counts[9] / counts[:9].mean() < 6
    assert counts.sum() == 100 * 10  # an epoch keeps its length


def test_balance_draws_rare_groups_more_often():
    # 8 men in their twenties, 2 girls of 3-9, 1 woman of 70+ with a race, 1 infant of unknown gender
    ages = [25] * 8 + [5, 7, 80, 1]
    genders = [1] * 8 + [0, 0, 0, -1]
    races = [""] * 10 + ["2", ""]
    assert balance_repeats(ages, genders, races, 1.0).tolist() == [1] * 8 + [4, 4, 6, 6]  # 8/1 capped at 6
    assert balance_repeats(ages, genders, races, 0.5).tolist() == [1] * 8 + [2, 2, 3, 3]  # sqrt(8) = 2.83
    assert balance_repeats(ages, genders, ["0"] * 6 + ["1"] * 2 + [""] * 4, 1.0)[:8].tolist() == [1] * 6 + [3, 3]
    assert balance_repeats(ages, genders, races, 0.0).tolist() == [1] * 12
    assert balance_repeats(ages, genders, races, 1.0, max_repeats=10).tolist()[-2:] == [8, 8]


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


def test_weighted_sampling_honours_the_weights():
    s = EpochBatchSampler(1000, 50, seed=0, sizes=[900, 100], weights=[0.5, 0.5])
    order = np.concatenate([list(b) for b in s])
    assert len(order) == 1000
    assert (order >= 900).mean() == pytest.approx(0.5, abs=0.01)
    small = order[order >= 900]
    assert np.bincount(small - 900, minlength=100).min() == 5  # the small source cycled 5 times, evenly
    s.set_epoch(0, start_batch=3)
    assert np.array_equal(np.concatenate([list(b) for b in s]), order[150:])  # resumable mid-epoch
    with pytest.raises(ValueError):
        EpochBatchSampler(1000, 50, sizes=[900, 100], weights=[1.0])


def test_mixed_faces_serve_both_sources(utk_cache, clap_cache):
    u, c = FaceCache(utk_cache, split="train", train=True), FaceCache(clap_cache, split="train", train=True)
    mix = MixedFaces([u, c], fill_outside=1.0)
    loader, sampler = make_loader(mix, 16, seed=0, workers=0, source_weights=[1, 1])
    batches = list(loader)
    genders = torch.cat([g for _, _, g, _, _ in batches])
    # each face's source index: CLAP2016 (1) is the source without gender labels
    assert torch.equal(torch.cat([s for _, _, _, s, _ in batches]) == 1, genders == -1)
    assert (genders == -1).float().mean() == pytest.approx(0.5, abs=0.07) and set(genders.tolist()) <= {-1, 0, 1}


def test_fill_outside_takes_real_pixels_from_a_donor():
    rng = np.random.default_rng(0)
    raw = np.zeros((2, 112, 96, 3), np.uint8)
    raw[0] = 50  # a tight crop: its top 30 rows are replicated border
    raw[1] = 200  # a donor that is real everywhere
    inside = np.ones((2, 112, 96), bool)
    inside[0, :30] = False
    from data_gen import _fill_outside

    _fill_outside(raw, inside, np.array([True, True]), rng.random(2))
    assert (raw[0, :30] == 200).all() and (raw[0, 30:] == 50).all() and (raw[1] == 200).all()
    x = augment(np.zeros((2, 112, 96, 3), np.uint8), np.random.default_rng(1), inside, fill_outside=0.0)
    assert x.shape == (2, 3, 112, 96)


def test_age_ranges_flow_through_the_cache_and_the_loader(range_cache, tmp_path, capsys):
    """FairFace-style labels (age_min, age_max, race by name): the cache keeps the ranges and the race, says
    its ages are apparent, and the loader hands each face's range to training."""
    from data_gen import SeededBatch

    with open(os.path.join(range_cache, "meta.csv"), newline="") as f:
        meta = list(csv.DictReader(f))
    with open(os.path.join(range_cache, "cache.json")) as f:
        assert json.load(f)["age_kind"] == "apparent"
    assert len(meta) >= 155 and {"age_min", "age_max", "race"} <= set(meta[0])
    for r in meta:
        lo, hi = int(r["age_min"]), int(r["age_max"])
        assert lo < hi and lo <= int(r["age"]) <= hi  # the group's middle, kept for grouping only
    assert "Black" in {r["race"] for r in meta}
    train_set = FaceCache(range_cache, split="train", train=True)
    assert train_set.age_kind == "apparent"
    rows = train_set.rows()
    assert train_set.spans.tolist() == [[int(r["age_min"]), int(r["age_max"])] for r in rows]
    x, age, gender, source, span = MixedFaces([train_set]).__getitems__(SeededBatch(list(range(8)), seed=1))
    assert x.shape == (8, 3, config.IMAGE_H, config.IMAGE_W) and span.tolist() == train_set.spans[:8].tolist()
    # a CSV with neither an age nor a range: one line, exit 2
    bad = write_csv([{"file": "a.jpg", "gender": 1}], tmp_path / "bad.csv", cols=("file", "gender"))
    code, _, err = run_main(pre_process.main, ["--dataset", "csv", "--labels", bad, "--data-dir", str(tmp_path), "--out",
                                               str(tmp_path / "o")], capsys)
    assert code == 2 and "age_min" in err and len(err.strip().splitlines()) == 1


def test_a_training_epoch_sees_every_face_in_whole_batches():
    """197 faces in batches of 128: two whole batches, the second topped up from the start of the epoch's
    order, so every face is seen; validation's last batch is short instead; `passes` repeats the set."""
    train = [list(b) for b in EpochBatchSampler(197, 128, seed=0, fill_last=True)]
    assert [len(b) for b in train] == [128, 128] and set(sum(train, [])) == set(range(197))
    val = [list(b) for b in EpochBatchSampler(197, 128, shuffle=False)]
    assert [len(b) for b in val] == [128, 69] and sum(val, []) == list(range(197))
    three = EpochBatchSampler(197, 128, seed=0, fill_last=True, passes=3)
    drawn = sum((list(b) for b in three), [])
    assert len(three) == 5 and len(drawn) == 640 and np.bincount(drawn[:591], minlength=197).tolist() == [3] * 197
    r0, r1 = (EpochBatchSampler(197, 32, seed=0, rank=r, world_size=2, fill_last=True) for r in (0, 1))
    a, b = sum((list(x) for x in r0), []), sum((list(x) for x in r1), [])
    assert len(a) == len(b) == 128 and set(a) | set(b) == set(range(197))  # DDP: whole batches, every face
