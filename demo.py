"""Find every face in photos, videos or a webcam, and annotate it with gender and age.

    python demo.py                                   # the sample photos in images/, released model
    python demo.py photo.jpg holiday/ --out out/demo --json out/demo.json
    python demo.py clip.mp4 --out out/video          # writes an annotated clip.mp4 into --out
    python demo.py 0 --max-frames 100                # webcam 0

Each face gets a box and a label such as `F 31 ±4` (gender, expected age, standard deviation of the
predicted age distribution). Writes the annotated images and contact_sheet.png (photo, aligned crop,
prediction) to --out and, with --json, one record per input. A file that cannot be read, or with no
face in it, gets a one-line message; the others still go through; the exit code is 1 if any failed.
"""
import argparse
import json
import os
import sys

import cv2
import numpy as np
import torch

import config
from data_gen import normalize
from metrics import apply_calibration
from models import CheckpointError, fuse_batchnorm, load_checkpoint
from utils import FaceDetector, InputError, align_face, fail, list_images, read_image, use_all_cores_for_cv2

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class AgeGenderPredictor:
    """Detect, align and predict: the whole pipeline, shared by demo.py, evaluate.py and bench.py."""

    def __init__(self, checkpoint=config.RELEASED_MODEL, device="cpu", tta=True, min_face_size=20, threshold=0.9, calibrated=True):
        self.device = torch.device(device)
        net, self.ckpt = load_checkpoint(checkpoint, self.device)
        self.net = fuse_batchnorm(net)
        self.detector = FaceDetector(min_face_size=min_face_size, threshold=threshold)
        self.tta = tta
        # fitted on validation data by calibrate.py: scales the shown ±std, tempers the gender probability
        self.calibration = self.ckpt.get("calibration") if calibrated else None

    @torch.no_grad()
    def predict_tensor(self, x):
        """Normalised faces (N x 3 x 112 x 96 tensor) -> dict of numpy arrays, calibrated."""
        out = {k: v.cpu().numpy() for k, v in self.net.predict(x.to(self.device), tta=self.tta).items()}
        out["gender_prob"], out["age_std"] = apply_calibration(out["gender_prob"], out["age_std"], self.calibration)
        return out

    def predict_crops(self, crops):
        """Aligned uint8 crops (N x 112 x 96 x 3, RGB) -> dict of numpy arrays."""
        if len(crops) == 0:
            return {"gender_prob": np.zeros((0, 2)), "age_prob": np.zeros((0, config.NUM_AGES)), "age": np.zeros(0), "age_std": np.zeros(0)}
        return self.predict_tensor(normalize(np.stack(crops)))

    def __call__(self, rgb, pad_fraction=0.0):
        """All faces in one RGB photo: (records, aligned crops)."""
        faces = self.detector.detect(rgb, pad_fraction=pad_fraction)
        crops = [align_face(rgb, f.landmarks) for f in faces]
        pred = self.predict_crops(crops)
        records = []
        for i, f in enumerate(faces):
            p_male = float(pred["gender_prob"][i, 1])
            records.append({
                "box": [round(float(v), 1) for v in f.box],
                "score": round(f.score, 4),
                "gender": "M" if p_male >= 0.5 else "F",
                "gender_prob": round(max(p_male, 1 - p_male), 4),
                "age": round(float(pred["age"][i]), 1),
                "age_std": round(float(pred["age_std"][i]), 1),
            })
        return records, crops


def draw(rgb, records):
    """The photo as BGR with a box and a `F 31 ±4` label on each face."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    scale = max(img.shape[:2]) / 800
    thick = max(1, int(round(2 * scale)))
    for r in records:
        x1, y1, x2, y2 = [int(round(v)) for v in r["box"]]
        color = (255, 128, 0) if r["gender"] == "M" else (80, 0, 255)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
        label = f"{r['gender']} {r['age']:.0f} +-{r['age_std']:.0f}"
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
        row[2].text(0.05, 0.5, f"{'female' if rec['gender'] == 'F' else 'male'} ({100 * rec['gender_prob']:.0f}%)\n"
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


def run_video(predictor, source, out_dir, max_frames, every, used):
    """Annotate a video file or a webcam; returns (record, error message or None)."""
    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not cap.isOpened():
        return {"file": source, "faces": [], "error": "cannot open video or camera"}, "cannot open video or camera"
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, frames, n_faces, k = None, [], 0, 0
    target = out_name(out_dir, f"camera{source}" if source.isdigit() else source, used) + ".mp4"
    while not max_frames or k < max_frames:
        ok, frame = cap.read()
        if not ok:
            break
        if k % every == 0:
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            records, _ = predictor(rgb)
            n_faces += len(records)
            frames.append({"frame": k, "faces": records})
            frame = draw(rgb, records)
            if writer is None:
                writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), fps / every, (frame.shape[1], frame.shape[0]))
            writer.write(frame)
        k += 1
    cap.release()
    if writer is not None:
        writer.release()
    if k == 0:
        return {"file": source, "faces": [], "error": "no frame could be read"}, "no frame could be read"
    print(f"{source}: {k} frames, {n_faces} faces -> {target}")
    return {"file": source, "frames": frames}, None


def main(argv=None):
    p = argparse.ArgumentParser(description="Annotate faces with gender and age",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders, video files or a webcam index (default: images/)")
    p.add_argument("--out", default=os.path.join(config.ROOT, "out", "demo"))
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL)
    p.add_argument("--json", default="", help="write one record per input to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="also predict on the mirror image")
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face to find, in pixels")
    p.add_argument("--threshold", type=float, default=0.9, help="detector score needed to accept a face")
    p.add_argument("--max-frames", type=int, default=0, help="videos/webcam: stop after this many frames (0 = all)")
    p.add_argument("--every", type=int, default=1, help="videos: annotate every N-th frame")
    args = p.parse_args(argv)

    try:
        predictor = AgeGenderPredictor(args.checkpoint, args.device, args.tta, args.min_face_size, args.threshold)
    except CheckpointError as e:
        fail(str(e))
    inputs = args.inputs or [os.path.join(config.ROOT, "images")]
    os.makedirs(args.out, exist_ok=True)
    records, sheet, failed, used = [], [], 0, set()

    def report_failure(path, reason):
        nonlocal failed
        failed += 1
        print(f"error: {path}: {reason}", file=sys.stderr)
        records.append({"file": path, "faces": [], "error": reason})

    for item in inputs:
        if item.isdigit() or item.lower().endswith(VIDEO_EXTENSIONS):
            if not item.isdigit() and not os.path.isfile(item):
                report_failure(item, "file not found")
                continue
            rec, err = run_video(predictor, item, args.out, args.max_frames, max(1, args.every), used)
            if err:
                report_failure(item, err)
            else:
                records.append(rec)
            continue
        files = list_images([item])
        if os.path.isdir(item) and not files:
            report_failure(item, "folder has no images")
            continue
        for path in files:
            try:
                rgb = read_image(path)
            except InputError as e:
                report_failure(path, str(e))
                continue
            faces, crops = predictor(rgb)
            annotated = draw(rgb, faces)
            target = out_name(args.out, path, used) + ".jpg"
            cv2.imwrite(target, annotated, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not faces:
                report_failure(path, "no face found")
                continue
            records.append({"file": path, "faces": faces})
            summary = ", ".join(f"{f['gender']} {f['age']:.0f}±{f['age_std']:.0f}" for f in faces)
            print(f"{path}: {len(faces)} face(s): {summary} -> {target}")
            thumb = annotated if max(annotated.shape[:2]) <= 800 else cv2.resize(annotated, None, fx=800 / max(annotated.shape[:2]), fy=800 / max(annotated.shape[:2]), interpolation=cv2.INTER_AREA)
            sheet += [(path, thumb, c, f) for c, f in zip(crops, faces)]
    contact_sheet(sheet, os.path.join(args.out, "contact_sheet.png"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(f"{len(records) - failed} of {len(records)} inputs annotated into {args.out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    use_all_cores_for_cv2()  # a command-line run never forks, so cv2 may use every core
    sys.exit(main())
