"""Each source's labels, read and cleaned into rows (file, age, gender, split, identity, ...): IMDB-WIKI's
.mat files, the label CSVs (UTKFace, CLAP2016, FairFace, AAF, your own), and the gender labels that fill in
what a source leaves unknown. pre_process.py turns the rows into a cache; evaluate.py reads labels here too.
"""
import datetime
import hashlib
import os
import sys

import numpy as np

import config
from utils import InputError, read_label_rows

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


# The original recipe's IMDB-WIKI cleaning rules: a face detected with confidence, alone in the photo, aged 0-100
MIN_FACE_SCORE = 1.0
MIN_AGE, MAX_AGE = 0, config.NUM_AGES - 1


def clean_imdb_wiki(mat, dataset, rejects):
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
    rule(f"face_score finite and >= {MIN_FACE_SCORE}", lambda r: np.isfinite(mat["face_score"][r["i"]]) and mat["face_score"][r["i"]] >= MIN_FACE_SCORE)
    rule("second_face_score is NaN (one face)", lambda r: np.isnan(mat["second_face_score"][r["i"]]))
    rule("gender is 0 or 1", lambda r: mat["gender"][r["i"]] in (0.0, 1.0))
    rule(f"{MIN_AGE} <= age <= {MAX_AGE}", lambda r: MIN_AGE <= r["age"] <= MAX_AGE)
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


def read_source(cfg, fractions, rejects):
    """(rows, the folder their files are relative to, the ages after cleaning and before any cap) of the
    source --dataset names; InputError where its labels cannot be read."""
    if cfg.dataset in ("imdb", "wiki"):
        mat_path = find_mat(cfg.data_dir, cfg.dataset)
        try:
            mat = load_mat(mat_path, cfg.dataset)
        except InputError as e:
            raise InputError(f"{mat_path}: {e}")
        rows = clean_imdb_wiki(mat, cfg.dataset, rejects)
        cleaned_ages = [r["age"] for r in rows]
        rows = cap_per_age(rows, cfg.max_per_age, cfg.seed, rejects)
        split_by_identity(rows, fractions, cfg.seed)
        return rows, os.path.dirname(mat_path), cleaned_ages
    # utkface, clap2016, fairface or csv (argparse refuses anything else)
    rows = load_label_csv(cfg.labels or os.path.join(cfg.data_dir, "labels.csv"), rejects, cfg.seed, fractions)
    if cfg.dataset == "clap2016":
        clap2016_splits(rows, cfg.clap_holdout, cfg.seed)
    return rows, cfg.data_dir, [r["age"] for r in rows]


def labels_age_kind(rows):
    """The age a labels CSV gives, where --age-kind does not say: apparent where its rows carry the votes'
    std (CLAP2016) or age ranges (FairFace's annotated groups), else real."""
    return "apparent" if any(r.get("age_std") or r["age_min"] != r["age_max"] for r in rows) else "real"


def read_labels(path, split, gender_labels=""):
    """Rows of a labels CSV (evaluate.py --labels) in `split`, with int age and gender; a row whose age or
    gender is not a number is skipped with a warning. `gender_labels` (a file,gender CSV) fills in the
    genders the CSV leaves empty."""
    genders = read_gender_labels(gender_labels) if gender_labels else None
    rows = [r for r in read_label_rows(path, required=("file", "gender")) if not split or r.get("split") == split]
    good = []
    for r in rows:
        try:
            (r["age"], r["age_min"], r["age_max"]), r["gender"] = parse_age(r), parse_gender(r["gender"])
        except (KeyError, ValueError):
            print(f"warning: {path}: row for {r['file']}: age/gender not a number, skipped", file=sys.stderr)
            continue
        good.append(r)
    return apply_gender_labels(good, genders, gender_labels) if genders is not None else good
