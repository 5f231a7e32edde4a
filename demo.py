"""Find every face in photos, videos or a webcam, and annotate it with gender and age.

    python demo.py                                   # the sample photos in images/, released model
    python demo.py photo.jpg holiday/ --out out/demo --json out/demo.json --csv out/demo.csv
    python demo.py big_folder/ --no-draw --csv out/faces.csv --workers 8   # thousands of photos, all cores
    python demo.py clip.mp4 --out out/video          # an annotated clip.mp4 with one stable label per person
    python demo.py 0 --max-frames 100                # webcam 0
    python demo.py photos/ --detector mtcnn          # the tiniest faces (down to 20 px), several times slower

The pipeline itself (detect, align, predict) is predictor.AgeGenderPredictor; this file is its command
line. On a CPU the network runs in onnxruntime, exported in memory at start, or for SFace (the released
model) in OpenCV's dnn module, which is faster for it (--runtime onnxruntime | opencv | torchscript | torch).

Each face gets a box and a label such as `F 31 ±4` (gender, age read off the predicted age distribution
as the checkpoint's calibration chose on validation, its mean or median; the ± is that distribution's
standard deviation, calibrated), or `? 1 ±1` where the gender is unsure: its probability is under the
threshold calibrate.py chose on validation (--unsure-below overrides it); the JSON keeps the gender
and its probability and says `"gender_unsure": true`. Writes the annotated images and contact_sheet.png (photo, aligned crop,
prediction) to --out and, with --json / --csv, one record per input / one row per face. In videos
faces are tracked (tracker.py) and each person's label is averaged over the frames seen so far.
A file that cannot be read, or with no face in it, gets a one-line message; the others still go
through; the exit code is 1 if any failed.

From Python, the same pipeline: `from predictor import AgeGenderPredictor` (predictor.py).
"""
import argparse
import csv
import json
import multiprocessing
import os
import sys

import cv2
import torch
from tqdm import tqdm

import config
from detector import DETECTORS, make_detector
from metrics import AGE_ESTIMATES
from models import CheckpointError, load_checkpoint, second_look_of, views_of
# the pipeline lives in predictor.py; demo.AgeGenderPredictor and demo.FaceRecord still work
from predictor import AgeGenderPredictor, FaceRecord, as_rgb, default_device  # noqa: F401
from runtimes import RUNTIMES
from utils import InputError, add_second_look_option, add_view_options, cores, fail, list_images, read_photo, use_all_cores_for_cv2

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def draw(rgb, records, box_scale=1.0):
    """The photo as BGR with a box and a `F 31 ±4` label on each face (`? 1 ±1`, in grey, where the gender is
    unsure); `box_scale`: the size of `rgb` over the photo's whose pixels the boxes are in (a JPEG decoded reduced)."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    scale = max(img.shape[:2]) / 800
    thick = max(1, int(round(2 * scale)))
    for r in records:
        x1, y1, x2, y2 = [int(round(v * box_scale)) for v in r["box"]]
        unsure = r.get("gender_unsure", False)
        color = (128, 128, 128) if unsure else (255, 128, 0) if r["gender"] == "M" else (80, 0, 255)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
        label = f"{'?' if unsure else r['gender']} {r['age']:.0f} +-{r['age_std']:.0f}"
        fs = 0.6 * max(scale, 0.5)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, fs, thick)
        ty = y1 - 4 if y1 - th - 8 > 0 else y2 + th + 8
        cv2.rectangle(img, (x1, ty - th - 4), (x1 + tw + 4, ty + base - 2), color, -1)
        cv2.putText(img, label, (x1 + 2, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), thick, cv2.LINE_AA)
    return img


def contact_sheet(entries, path, max_rows=12):
    """Photo, aligned crop and prediction side by side, like the original README's table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = entries[:max_rows]
    if not entries:
        return
    fig, axes = plt.subplots(len(entries), 3, figsize=(8, 2.2 * len(entries)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1, 1.4]})
    for row, (name, photo_bgr, crop, rec) in zip(axes, entries):
        row[0].imshow(cv2.cvtColor(photo_bgr, cv2.COLOR_BGR2RGB))
        row[0].set_title(os.path.basename(name)[:40], fontsize=8)
        row[1].imshow(crop)
        unsure = ", unsure" if rec.get("gender_unsure") else ""
        row[2].text(0.05, 0.5, f"{'female' if rec['gender'] == 'F' else 'male'} ({100 * rec['gender_prob']:.0f}%{unsure})\n"
                    f"age {rec['age']:.0f} ± {rec['age_std']:.0f}", fontsize=11, va="center")
        for a in row:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def out_name(out_dir, path, used):
    base = os.path.splitext(os.path.basename(path))[0] or "image"
    name, k = base, 1
    while name in used:  # two inputs with the same name in different folders
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return os.path.join(out_dir, name)


def process_photo(predictor, job):
    """Read, predict, annotate and save one photo; returns what the main process needs to report it."""
    k, path, target, draw_it, want_sheet = job
    try:
        photo = read_photo(path)
        records, crops = predictor.analyse(photo)
    except InputError as e:  # unreadable, or its full pixels broken past the part decoded reduced
        return {"file": path, "error": str(e)}
    faces = [r.to_dict() for r in records]
    result = {"file": path, "faces": faces, "target": None, "sheet": []}
    if draw_it:
        # on the pixels decoded already: a large JPEG whose faces needed no more is drawn at its reduced size
        rgb = photo.full() if photo.has_full else photo.rgb
        annotated = draw(rgb, faces, rgb.shape[1] / photo.size[0])
        cv2.imwrite(target, annotated, [cv2.IMWRITE_JPEG_QUALITY, 90])
        result["target"] = target
        if want_sheet:
            side = max(annotated.shape[:2])
            thumb = annotated if side <= 800 else cv2.resize(annotated, None, fx=800 / side, fy=800 / side, interpolation=cv2.INTER_AREA)
            result["sheet"] = [(path, thumb, c, f) for c, f in zip(crops, faces)]
    if not faces:
        result["error"] = "no face found"
    return result


_worker_predictor = None


def _start_worker(predictor_args):
    global _worker_predictor
    torch.set_num_threads(1)  # one process per core: threads inside each would only compete
    cv2.setNumThreads(1)
    _worker_predictor = AgeGenderPredictor(**predictor_args, detector_threads=1)


def _worker_job(job):
    return process_photo(_worker_predictor, job)


def run_photos(jobs, predictor_args, workers, get_predictor):
    """Results of process_photo for every job, in the jobs' order, on `workers` processes."""
    workers = max(1, min(workers, len(jobs)))
    bar = dict(total=len(jobs), desc="photos", unit="photo", disable=len(jobs) < 2)
    if workers == 1:
        predictor = get_predictor()
        yield from tqdm((process_photo(predictor, j) for j in jobs), **bar)
        return
    # fork: the workers start at once and share the parent's imported modules
    with multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker, initargs=(predictor_args,)) as pool:
        # photos go out four at a time: one at a time cost about a tenth of the speed-up in round trips
        # (bench.py folder: 1.67x with 2 workers against 1.84-1.97x)
        yield from tqdm(pool.imap(_worker_job, jobs, chunksize=4), **bar)


def run_video(predictor, source, out_dir, max_frames, every, used, draw_it=True, detect_every=1):
    """Annotate a video file or a webcam, tracking faces; returns (record, error message or None).

    Every `every`-th frame is annotated; of those, every `detect_every`-th runs the detector, and in
    between each face the tracker holds is carried forward at its predicted place (box and landmarks
    moved at the track's velocity), aligned and predicted there: the detector is most of the cost."""
    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not cap.isOpened():
        return {"file": source, "faces": [], "error": "cannot open video or camera"}, "cannot open video or camera"
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if not source.isdigit() else 0
    writer, frames, n_faces, k = None, [], 0, 0
    # the averaged distribution's std gets the same calibration factor as a single face's
    tracker = predictor.tracker(max_lost=max(2, 15 // every))
    target = out_name(out_dir, f"camera{source}" if source.isdigit() else source, used) + ".mp4"
    bar = tqdm(total=min(total, max_frames or total) or None, desc=os.path.basename(source), unit="frame")
    while not max_frames or k < max_frames:
        ok, frame = cap.read()
        if not ok:
            break
        bar.update(1)
        if k % every == 0:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            carried = tracker.carried_forward(k) if (k // every) % detect_every else None
            if carried is None:
                records = predictor.analyse(rgb, distribution=True)[0]
            else:
                records = predictor.analyse_known(rgb, carried, distribution=True)[0]
            faces = [{**r.to_dict(), "detected": carried is None} for r in records]
            ids = tracker.update(k, faces)
            shown = []
            for f, tid in zip(faces, ids):
                f.pop("age_distribution")  # the tracker has it; the JSON keeps the summary
                f.pop("apparent_age_distribution", None)
                f["track"] = tid
                f["track_label"] = tracker.tracks[tid].summary()  # the person's label so far: what is shown
                shown.append({**f, **f["track_label"]})
            n_faces += len(faces)
            frames.append({"frame": k, "faces": faces})
            if draw_it:
                annotated = draw(rgb, shown)
                if writer is None:
                    writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), fps / every, (annotated.shape[1], annotated.shape[0]))
                writer.write(annotated)
        k += 1
    bar.close()
    cap.release()
    if writer is not None:
        writer.release()
    if k == 0:
        return {"file": source, "faces": [], "error": "no frame could be read"}, "no frame could be read"
    tracks = [t.to_dict() for t in tracker.tracks.values()]
    tqdm.write(f"{source}: {k} frames, {n_faces} faces, {len(tracks)} tracked people" + (f" -> {target}" if draw_it else ""))
    return {"file": source, "frames": frames, "tracks": tracks}, None


CSV_COLUMNS = ["file", "frame", "face", "track", "x1", "y1", "x2", "y2", "score", "gender", "gender_prob", "gender_unsure", "age", "age_std",
               "apparent_age", "apparent_age_std"]  # the last two empty for a model with one age output


def csv_rows(record):
    """One row per face of a photo's or a video's record."""
    per_frame = record.get("frames") or [{"frame": "", "faces": record.get("faces", [])}]
    for fr in per_frame:
        for i, f in enumerate(fr["faces"]):
            x1, y1, x2, y2 = f["box"]
            yield {"file": record["file"], "frame": fr["frame"], "face": i, "track": f.get("track", ""), "x1": x1, "y1": y1,
                   "x2": x2, "y2": y2, "score": f["score"], "gender": f["gender"], "gender_prob": f["gender_prob"],
                   "gender_unsure": int(f.get("gender_unsure", False)), "age": f["age"], "age_std": f["age_std"],
                   "apparent_age": f.get("apparent_age", ""), "apparent_age_std": f.get("apparent_age_std", "")}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Annotate faces with gender and age", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders, video files or a webcam index (default: images/)")
    p.add_argument("--out", default=os.path.join(config.ROOT, "out", "demo"), help="folder for the annotated photos, videos and contact sheet")
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="the model to run")
    p.add_argument("--json", default="", help="write one record per input to this file")
    p.add_argument("--csv", default="", help="write one row per face to this file (file, frame, face, track, box, gender, age)")
    p.add_argument("--no-draw", action="store_true", help="write only --json/--csv: no annotated images, videos or contact sheet")
    p.add_argument("--workers", type=int, default=cores(),
                   help="processes for photos, each on one thread (processes x threads <= the cores; videos run in the main one)")
    p.add_argument("--verbose", action="store_true", help="one line per photo instead of a progress bar")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when present, else cpu)")
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="what runs the network: auto = on a CPU onnxruntime (MobileNetV2 several times faster than eager PyTorch) or OpenCV's dnn module (SFace, faster than a frozen TorchScript graph: bench.py infer), on a GPU PyTorch; torch = eager PyTorch")
    add_view_options(p)
    add_second_look_option(p)
    p.add_argument("--age-estimate", default=None, choices=AGE_ESTIMATES,
                   help="read each age off the predicted distribution as its mean or its median (default: what calibrate.py chose on "
                        "validation for the checkpoint, else the mean; the released model: the median)")
    p.add_argument("--unsure-below", type=float, default=None,
                   help="show a face's gender as unsure ('?') when its probability is under this (default: the threshold calibrate.py chose "
                        f"on validation for the checkpoint, else {config.GENDER_UNSURE_BELOW}; 0: never)")
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face to find, in pixels")
    p.add_argument("--threshold", type=float, default=None, help="detector score needed to accept a face (default: the detector's own, 0.9 mtcnn, 0.6 yunet, 0.8 retinaface)")
    p.add_argument("--detector", default=config.DETECTOR, choices=sorted(DETECTORS),
                   help="face detector: yunet (one fast pass; a large photo whose faces are small gets a second pass at the "
                        "resolution they need), mtcnn (an image pyramid: the tiniest faces, down to 20 px, several times slower) "
                        "or retinaface (misses many faces under ~30 px); docs/DETECTORS.md")
    p.add_argument("--max-frames", type=int, default=0, help="videos/webcam: stop after this many frames (0 = all)")
    p.add_argument("--every", type=int, default=1, help="videos: annotate every N-th frame")
    p.add_argument("--detect-every", type=int, default=2,
                   help="videos: run the detector on every K-th annotated frame and carry tracked faces forward in between "
                        "(1: detect on every frame; 2 and 3 keep the test clip's two crossing people apart)")
    return p.parse_args(argv)


def main(argv=None, use_all_cores=False):
    """use_all_cores: let cv2 use every core in this process (a command-line run), once no worker will fork."""
    args = parse_args(argv)
    args.device = args.device or default_device()
    predictor_args = dict(checkpoint=args.checkpoint, device=args.device, tta=args.tta, min_face_size=args.min_face_size, threshold=args.threshold,
                          detector=args.detector, runtime=args.runtime, tta_zoom=args.tta_zoom, age_estimate=args.age_estimate,
                          unsure_below=args.unsure_below, second_look=args.second_look)
    try:
        net, ckpt = load_checkpoint(args.checkpoint)  # a bad checkpoint or factor is one line here, before any worker starts
        net.set_tta_zoom(views_of(ckpt, args.tta, args.tta_zoom)[1])
        second_look_of(ckpt, args.second_look)
        make_detector(args.detector, args.min_face_size, args.threshold)  # so is a detector that cannot load
        if args.unsure_below is not None and not 0 <= args.unsure_below <= 1:
            raise ValueError(f"--unsure-below {args.unsure_below}: give a probability between 0 and 1 (0: never unsure)")
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    main_predictor = []

    def get_predictor():
        if not main_predictor:
            if use_all_cores:
                # only now, never before worker processes fork: a process forked after cv2 has started
                # its thread pool deadlocks in cv2 (photos run first, in the workers; videos after)
                use_all_cores_for_cv2()
            main_predictor.append(AgeGenderPredictor(**predictor_args))
        return main_predictor[0]

    inputs = args.inputs or [os.path.join(config.ROOT, "images")]
    draw_it = not args.no_draw
    if draw_it:
        os.makedirs(args.out, exist_ok=True)
    # every input becomes one or more numbered slots, so the output order never depends on --workers
    slots, jobs, videos, used = [], [], [], set()
    for item in inputs:
        if item.isdigit() or item.lower().endswith(VIDEO_EXTENSIONS):
            videos.append((len(slots), item))
            slots.append({"file": item, "faces": [], "error": "file not found"} if not item.isdigit() and not os.path.isfile(item) else None)
            continue
        files = list_images([item])
        if os.path.isdir(item) and not files:
            slots.append({"file": item, "faces": [], "error": "folder has no images"})
            continue
        for path in files:
            jobs.append((len(slots), path, out_name(args.out, path, used) + ".jpg", draw_it, len(jobs) < 12))
            slots.append(None)

    sheet = []
    for job, res in zip(jobs, run_photos(jobs, predictor_args, args.workers if args.device == "cpu" else 1, get_predictor)):
        slots[job[0]] = {"file": res["file"], "faces": res.get("faces", []), **({"error": res["error"]} if "error" in res else {})}
        sheet += res.get("sheet", [])
        if args.verbose and res.get("faces"):
            summary = ", ".join(f"{'?' if f['gender_unsure'] else f['gender']} {f['age']:.0f}±{f['age_std']:.0f}" for f in res["faces"])
            tqdm.write(f"{res['file']}: {len(res['faces'])} face(s): {summary}" + (f" -> {res['target']}" if res.get("target") else ""))
    for slot, item in videos:
        if slots[slot] is None:
            rec, err = run_video(get_predictor(), item, args.out, args.max_frames, max(1, args.every), used, draw_it,
                                 max(1, args.detect_every))
            slots[slot] = {**rec, "error": err} if err else rec

    failed = 0
    for rec in slots:
        if rec.get("error"):
            failed += 1
            print(f"error: {rec['file']}: {rec['error']}", file=sys.stderr)
    if draw_it:
        contact_sheet(sheet, os.path.join(args.out, "contact_sheet.png"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(slots, f, indent=1)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for rec in slots:
                w.writerows(csv_rows(rec))
    where = f" into {args.out}" if draw_it else ""
    print(f"{len(slots) - failed} of {len(slots)} inputs annotated{where}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(use_all_cores=True))
