"""Annotate a whole photo collection on Ray: one Parquet row per face, resumable, with an audit summary.

    python annotate.py photos/ --out out/annotations                       # an embedded local Ray: nothing to set up
    python annotate.py list.txt index.parquet more/ --out out/ann --address auto        # a running cluster
    python annotate.py s3://bucket/photos/ --out s3://bucket/ann --address ray://HEAD:10001 --num-gpus 0.5

Inputs: folders (searched recursively), text files of paths (one a line), CSV or Parquet files with a `path`
column, or photos; any path pyarrow's filesystems read (local; s3:// and gs:// where the cluster has access).
The photos run through predictor.py's pipeline on Ray Data: decoding, detection and alignment in CPU actors
(`FindFaces`), the network in actors that load the model once and read the faces of many photos in one
batch (`ReadFaces`, `--num-gpus` each where the cluster has GPUs). The driver writes what comes back to
OUT/parts/ in Parquet parts of whole photos as it goes, each written whole or not at all: one row per face
with demo.py --json's fields plus file, face index and photo size, and one row per photo that failed or had
no face with the reason (`error`). The same command after a crash or Ctrl-C reads only the photos no part
holds; a finished job run again adds nothing. At the end OUT/summary.json, summary.png and summary.md audit
the collection: faces by gender and age group with the share shown unsure, the ages by gender, the
failures by reason. Where the work runs and how it scales: docs/SCALE.md.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import uuid

import numpy as np

import config
from utils import IMAGE_EXTENSIONS, InputError, fail

# the columns of every part, in this order: a face row fills the face fields, a failure row `error`
FACE_FIELDS = {"box": "list<double>", "score": "double", "landmarks": "list<list<double>>", "gender": "string",
               "gender_prob": "double", "gender_unsure": "bool", "age": "double", "age_std": "double",
               "apparent_age": "double", "apparent_age_std": "double"}


def schema():
    import pyarrow as pa

    kinds = {"string": pa.string(), "double": pa.float64(), "bool": pa.bool_(), "int64": pa.int64(),
             "list<double>": pa.list_(pa.float64()), "list<list<double>>": pa.list_(pa.list_(pa.float64()))}
    head = {"file": "string", "face": "int64", "photo_width": "int64", "photo_height": "int64"}
    return pa.schema([(k, kinds[v]) for k, v in {**head, **FACE_FIELDS, "error": "string"}.items()])


# ----------------------------------------------------------------------------- inputs


def filesystem(path):
    """(pyarrow filesystem, path within it) for a local path or a URI (s3://, gs://, file://)."""
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), os.path.abspath(path)


def list_inputs(items):
    """Every photo the inputs name, in a stable order: folders searched recursively, text files of paths,
    CSV / Parquet files with a `path` column, the rest taken as photos (a missing one becomes a failure row)."""
    from pyarrow import fs as pafs

    out = []
    for item in items:
        fs, path = filesystem(item)
        info = fs.get_file_info(path)
        scheme = item.split("://", 1)[0] + "://" if "://" in item else ""
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            out += sorted(scheme + f.path for f in found if f.type == pafs.FileType.File and f.path.lower().endswith(IMAGE_EXTENSIONS))
        elif info.type == pafs.FileType.File and path.lower().endswith((".txt", ".csv", ".parquet")):
            out += paths_listed_in(fs, path, item)
        else:
            out.append(item if scheme else os.path.abspath(item))
    return out


def paths_listed_in(fs, path, name):
    """The photos a text file (one a line), a CSV or a Parquet file (a `path` column) lists; relative paths
    are taken from the list's own folder."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if path.endswith(".txt"):
        with fs.open_input_stream(path) as f:
            paths = [line.strip() for line in f.read().decode().splitlines() if line.strip() and not line.startswith("#")]
    else:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f) if path.endswith(".parquet") else pcsv.read_csv(f)
        if "path" not in table.column_names:
            fail(f"{name}: no `path` column (it has {', '.join(table.column_names)})")
        paths = [str(p) for p in table.column("path").to_pylist() if p]
    folder = name.rsplit("/", 1)[0] if "://" in name else os.path.dirname(os.path.abspath(name))
    return [p if "://" in p or os.path.isabs(p) else f"{folder}/{p}" for p in paths]


def done_files(out):
    """The photos the parts written so far hold (each part holds whole photos)."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    fs, root = filesystem(out)
    parts = [f.path for f in fs.get_file_info(pafs.FileSelector(root + "/parts", allow_not_found=True))
             if f.path.endswith(".parquet") and not os.path.basename(f.path).startswith(".")]
    done = set()
    for part in parts:
        with fs.open_input_file(part) as f:
            done.update(pq.read_table(f, columns=["file"]).column("file").to_pylist())
    return done


# ----------------------------------------------------------------------------- the two stages


class FindFaces:
    """Decode, detect and align (a CPU actor): each photo -> its size, its faces (boxes, scores, landmarks as
    JSON) and their aligned crops (bytes), or the reason it failed."""

    def __init__(self, detector, min_face_size, threshold):
        import cv2

        from detector import make_detector

        cv2.setNumThreads(1)  # one actor a core
        self.detector = make_detector(detector, min_face_size, threshold, threads=1)

    def __call__(self, batch):
        from detector import find_faces

        out = {k: [] for k in ("file", "width", "height", "faces", "crops", "error")}
        for path in batch["file"]:
            faces, crops, size, error = [], [], (0, 0), ""
            try:
                photo = read_input(path)
                size = photo.size
                faces, crops = find_faces(photo, self.detector)
            except InputError as e:
                error = str(e)
            out["file"].append(path)
            out["width"].append(size[0])
            out["height"].append(size[1])
            out["faces"].append(json.dumps([[f.box.tolist(), f.score, f.landmarks.tolist()] for f in faces]))
            out["crops"].append(np.stack(crops).tobytes() if crops else b"")
            out["error"].append(error)
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def read_input(path):
    """A photo by local path (read as demo.py reads it) or URI (its bytes through pyarrow's filesystems)."""
    from utils import read_photo

    if "://" not in path:
        return read_photo(path)
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            data = f.read()
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"unreadable ({str(e).splitlines()[0][:120]})")
    return read_photo(data)


class ReadFaces:
    """The network (an actor that loads the model once): the faces of a batch of photos read together ->
    each photo's records, exactly as demo.py --json writes them (a JSON list)."""

    def __init__(self, checkpoint_bytes, predictor_args, batch_size):
        import cv2
        import torch

        from predictor import AgeGenderPredictor

        torch.set_num_threads(1)  # half a CPU: the detectors beside it have the rest
        cv2.setNumThreads(1)
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            f.write(checkpoint_bytes)
        self.predictor = AgeGenderPredictor(f.name, **predictor_args)
        os.unlink(f.name)
        self.batch_size = batch_size

    def __call__(self, batch):
        from detector import Face

        found = []
        for faces, crops in zip(batch["faces"], batch["crops"]):
            faces = [Face(b, s, lm) for b, s, lm in json.loads(faces)]
            pixels = np.frombuffer(crops, np.uint8).reshape(len(faces), config.IMAGE_H, config.IMAGE_W, 3) if faces else []
            found.append((faces, list(pixels)))
        results = self.predictor.predict_found(found, self.batch_size)
        records = [json.dumps([r.to_dict() for r in records]) for records, _ in results]
        return {"file": batch["file"], "width": batch["width"], "height": batch["height"], "error": batch["error"],
                "records": np.array(records, dtype=object)}


# ----------------------------------------------------------------------------- output


def rows_of(photo):
    """A photo's rows: one per face, or one naming why there is none."""
    head = {"file": photo["file"], "photo_width": int(photo["width"]) or None, "photo_height": int(photo["height"]) or None}
    records = json.loads(photo["records"])
    if photo["error"] or not records:
        return [{**head, "face": None, "error": photo["error"] or "no face found"}]
    return [{**head, "face": k, "error": None, **{f: r.get(f) for f in FACE_FIELDS}} for k, r in enumerate(records)]


class PartWriter:
    """Whole photos' rows into OUT/parts/, a part every `photos_per_part` photos, each written to a hidden
    file first and renamed: a part is there whole or not at all, so a crash loses at most the photos not yet
    in a part, which the next run reads again."""

    def __init__(self, out, photos_per_part):
        self.fs, root = filesystem(out)
        self.folder = root + "/parts"
        self.fs.create_dir(self.folder, recursive=True)
        self.photos_per_part, self.rows, self.photos, self.parts = photos_per_part, [], 0, 0
        self.run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def add(self, photo):
        """Keep a photo's rows for the part being filled (written once it holds photos_per_part); return them."""
        rows = rows_of(photo)
        self.rows += rows
        self.photos += 1
        if self.photos >= self.photos_per_part:
            self.flush()
        return rows

    def flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=schema())
        name = f"part-{self.run}-{self.parts:05d}.parquet"
        tmp = f"{self.folder}/.{name}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, f"{self.folder}/{name}")
        self.rows, self.photos, self.parts = [], 0, self.parts + 1


def read_dataset(out):
    """Every row of the job's parts as one pyarrow table."""
    import pyarrow.dataset as ds

    fs, root = filesystem(out)
    return ds.dataset(root + "/parts", filesystem=fs, format="parquet", schema=schema()).to_table()


def audit(table):
    """The collection in figures: faces by gender and age group with the share shown unsure, the age
    histogram by gender, failures by reason."""
    from metrics import age_group

    rows = table.to_pylist()
    faces = [r for r in rows if r["error"] is None]
    groups = age_groups()
    cells = {}
    for r in faces:
        band = age_group(min(max(int(round(r["age"])), 0), config.NUM_AGES - 1))  # the age read, to the nearest year
        cell = cells.setdefault(r["gender"], {}).setdefault(band, [0, 0])
        cell[0] += 1
        cell[1] += bool(r["gender_unsure"])
    failures = {}
    for r in rows:
        if r["error"] is not None:
            reason = r["error"] if r["error"] == "no face found" else r["error"].split(" (")[0]
            failures[reason] = failures.get(reason, 0) + 1
    return {"photos": len({r["file"] for r in rows}), "faces": len(faces), "photos_without_face_or_failed": sum(failures.values()),
            "faces_by_gender_and_age_group": {g: {a: {"faces": c[0], "shown_unsure": round(c[1] / c[0], 4)} for a, c in
                                                  sorted(by.items(), key=lambda kv: groups.index(kv[0]))} for g, by in sorted(cells.items())},
            "age_histogram_by_gender": {g: np.histogram([r["age"] for r in faces if r["gender"] == g], bins=20, range=(0, 100))[0].tolist()
                                        for g in sorted(cells)},
            "failures_by_reason": dict(sorted(failures.items(), key=lambda kv: -kv[1]))}


def write_summary(out, summary):
    """summary.json, summary.png (the ages by gender) and summary.md beside the parts."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, root = filesystem(out)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    edges = np.linspace(0, 100, 21)
    for g, colour in (("F", "#d0406a"), ("M", "#3b78c2")):
        if g in summary["age_histogram_by_gender"]:
            ax.stairs(summary["age_histogram_by_gender"][g], edges, color=colour, lw=2, label={"F": "women", "M": "men"}[g])
    ax.set_xlabel("predicted real age")
    ax.set_ylabel("faces")
    ax.set_title(f"{summary['faces']:,} faces in {summary['photos']:,} photos", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=90, format="png")
    plt.close(fig)
    lines = [f"# Audit: {summary['faces']:,} faces in {summary['photos']:,} photos", "",
             f"{summary['photos_without_face_or_failed']:,} photos without a face or unreadable. The ages are the model's reading "
             "of each face (real age), the genders its binary reading; `unsure` is the share whose gender it shows as `?`.", "",
             "| gender | " + " | ".join(age_groups()) + " |", "| --- |" + " --- |" * len(age_groups())]
    for g, by in summary["faces_by_gender_and_age_group"].items():
        lines.append(f"| {g} | " + " | ".join(f"{by[a]['faces']:,} ({100 * by[a]['shown_unsure']:.0f}% unsure)" if a in by else "0"
                                             for a in age_groups()) + " |")
    lines += ["", "![ages by gender](summary.png)", "", "| failure | photos |", "| --- | --- |"]
    lines += [f"| {reason} | {n:,} |" for reason, n in summary["failures_by_reason"].items()] or ["| none | 0 |"]
    for name, data in (("summary.json", json.dumps(summary, indent=1).encode()), ("summary.png", png.getvalue()),
                       ("summary.md", ("\n".join(lines) + "\n").encode())):
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(data)


def age_groups():
    """The names of config.AGE_GROUPS, youngest first."""
    from metrics import age_group

    return [age_group(lo) for lo, _ in config.AGE_GROUPS]


# ----------------------------------------------------------------------------- the job


def connect(address, cpus):
    """Ray: embedded and local (no address), or a running cluster (auto, HOST:PORT, ray://HOST:10001), which
    gets this repository's code (not its data or weights: the checkpoint travels as bytes)."""
    import logging

    # the C++ core's notes (an actor's constructor arguments held in the object store) and Ray Data's plan
    # go to Ray's log files, not the user's terminal: the driver's own lines say what happens
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not address:
        # an embedded Ray is one node: its processes talk over the loopback address, not the machine's own
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's own bar counts photos
    if address:
        excludes = [".git", "data", "checkpoints", "out", "docs", "tests", "images", "weights", "web", "*.pt", "*.onnx", "*.mp4"]
        ray.init(address=address, runtime_env={"working_dir": config.ROOT, "excludes": excludes}, log_to_driver=False,
                 logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=cpus or None, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": config.ROOT}})
    return ray


def build_pipeline(ray, todo, args):
    """Ray Data: the photos -> FindFaces (CPU actors) -> ReadFaces (network actors, --num-gpus each)."""
    with open(args.checkpoint, "rb") as f:
        checkpoint = f.read()
    predictor_args = dict(device="cuda" if args.num_gpus else "cpu", tta=args.tta, tta_zoom=args.tta_zoom,
                          second_look=args.second_look, unsure_below=args.unsure_below, age_estimate=args.age_estimate,
                          runtime=args.runtime, detector=args.detector)
    # every actor asks for half a CPU: a detector for each CPU keeps the cores busy, the network actors
    # (a quarter of a photo's time on a CPU) share them, and a node of one CPU still takes two actors
    cpus = int(ray.cluster_resources().get("CPU", 1))
    network_actors = args.network_actors or max(1, cpus // 4)
    find_actors = args.find_actors or cpus
    ds = ray.data.from_items([{"file": p} for p in todo], override_num_blocks=max(1, min(len(todo), len(todo) // 4 + 1, 4096)))
    ds = ds.map_batches(FindFaces, batch_size=4, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=find_actors), num_cpus=0.5,
                        fn_constructor_kwargs=dict(detector=args.detector, min_face_size=args.min_face_size, threshold=args.threshold))
    return ds.map_batches(ReadFaces, batch_size=args.photos_per_batch, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=network_actors),
                          num_cpus=0.5, num_gpus=args.num_gpus or None,
                          fn_constructor_kwargs=dict(checkpoint_bytes=checkpoint, predictor_args=predictor_args, batch_size=64))


def run(args):
    from tqdm import tqdm

    inputs = list_inputs(args.inputs)
    if not inputs:
        fail(f"no photos in {', '.join(args.inputs)}")
    done = done_files(args.out)
    todo = [p for p in dict.fromkeys(inputs) if p not in done]
    print(f"{len(inputs):,} photos listed, {len(done & set(inputs)):,} already annotated in {args.out}, {len(todo):,} to do", flush=True)
    failures, faces, t_start, t_first = 0, 0, time.perf_counter(), None
    if todo:
        t0 = time.perf_counter()
        ray = connect(args.address, args.num_cpus)
        startup = time.perf_counter() - t0
        writer = PartWriter(args.out, args.photos_per_part)
        bar = tqdm(total=len(todo), unit="photo", desc="annotate", disable=args.quiet)
        t_start = time.perf_counter()
        try:
            for batch in build_pipeline(ray, todo, args).iter_batches(batch_size=None, batch_format="numpy"):
                t_first = t_first or time.perf_counter()
                for i in range(len(batch["file"])):
                    rows = writer.add({k: batch[k][i] for k in batch})
                    n = sum(r["error"] is None for r in rows)
                    faces += n
                    failures += not n
                    bar.update(1)
        except KeyboardInterrupt:
            writer.flush()  # the whole photos read so far are kept
            bar.close()
            print(f"stopped: {bar.n:,} photos written; the same command goes on from there", file=sys.stderr)
            return 130
        writer.flush()
        bar.close()
        elapsed = time.perf_counter() - t_start
        print(f"annotated {len(todo):,} photos ({faces:,} faces) in {elapsed:.1f} s after Ray's start-up of {startup:.1f} s, the first "
              f"back after {t_first - t_start:.1f} s (the actors starting): {len(todo) / elapsed:.2f} photos/s; "
              f"{failures:,} without a face or unreadable (summary.md says why)")
    summary = audit(read_dataset(args.out))
    write_summary(args.out, summary)
    print(f"{args.out}: {summary['photos']:,} photos, {summary['faces']:,} faces; summary.json, summary.png, summary.md")
    return 0


def parse_args(argv=None):
    from detector import DETECTORS
    from metrics import AGE_ESTIMATES
    from runtimes import RUNTIMES
    from utils import add_second_look_option, add_view_options

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="folders, text files of paths, CSV / Parquet files with a `path` column, or photos")
    p.add_argument("--out", required=True, help="the job's folder (local or a URI): parts/*.parquet and the summary")
    p.add_argument("--address", default="", help="the Ray cluster to join: auto, HOST:PORT or ray://HOST:10001 (default: an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=0, help="the embedded Ray's CPUs (default: all of this machine's)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for each network actor (0: the network on CPUs)")
    p.add_argument("--find-actors", type=int, default=0, help="decode-and-detect actors, half a CPU each (default: one a CPU)")
    p.add_argument("--network-actors", type=int, default=0, help="network actors, half a CPU each (default: one for every four of "
                                                                 "the cluster's CPUs, at least 1)")
    p.add_argument("--photos-per-batch", type=int, default=32, help="photos whose faces a network actor reads together")
    p.add_argument("--photos-per-part", type=int, default=500, help="photos in each Parquet part the driver writes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="the model to run (sent to the actors as bytes)")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES, help="what runs the network (as demo.py)")
    add_view_options(p)
    add_second_look_option(p)
    p.add_argument("--age-estimate", default=None, choices=AGE_ESTIMATES, help="each age as its distribution's mean or median "
                                                                            "(default: as calibrate.py chose)")
    p.add_argument("--unsure-below", type=float, default=None, help="gender probability under which a face's gender is unsure "
                                                                    "(default: the checkpoint's threshold)")
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face to find, in pixels")
    p.add_argument("--threshold", type=float, default=None, help="detector score needed to accept a face (default: the detector's own)")
    p.add_argument("--detector", default=config.DETECTOR, choices=sorted(DETECTORS), help="the face detector (as demo.py)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        fail("annotate.py needs Ray Data: pip install 'ray[data]'")
    from models import CheckpointError, load_checkpoint

    try:
        load_checkpoint(args.checkpoint)  # a bad checkpoint is one line here, not a failed actor on the cluster
    except CheckpointError as e:
        fail(str(e))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
