"""Shared helpers: robust image reading, config parsing from config.py, atomic saves."""
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


def cores():
    """The CPU cores this process may run on (its affinity: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def use_all_cores_for_cv2():
    cv2.setNumThreads(cores())


class InputError(Exception):
    """A file that cannot be used, with a short human-readable reason."""


def fail(message, code=2):
    """One clear line on stderr and a non-zero exit: how every script reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------- command line


def _documented_fields(cfg_class):
    """(help, group) of each field of a config dataclass: the help is the comment on its line in config.py,
    or the comment lines just above it (config.py's comments are the documentation of every option); the
    group is the title of the last `# == title` line above it, or None before the first. A field with both
    is a stray comment (a trailing comment run on to the next line, a section title written as a plain
    comment) that would be glued onto its help: a ValueError naming it."""
    import inspect

    helps, groups, above, group = {}, {}, [], None
    for line in inspect.getsource(cfg_class).splitlines()[1:]:
        text = line.strip()
        if text.startswith("# =="):
            group, above = text[4:].strip(), []
            continue
        if text.startswith("#"):
            above.append(text.lstrip("# ").strip())
            continue
        name = text.split(":", 1)[0].strip()
        if ":" in text and name.isidentifier():
            trailing = text.split("  # ", 1)[1].strip() if "  # " in text else ""
            if above and trailing:
                raise ValueError(f"{cfg_class.__name__}.{name}: documented both above ({above}) and on its line")
            helps[name], groups[name] = " ".join(above) or trailing, group
        above = []
    return helps, groups


def parse_config(cfg_class, argv=None, description=None, positional=None, choices=None):
    """Build an argparse parser from a config dataclass: every field becomes `--field-name`, with its
    comment in config.py as help and its default shown, listed under the `# == title` above it. `choices` maps a field to its allowed values
    (argparse lists and checks them); a `tuple[str, ...]` field takes one or more values."""
    import typing

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if positional:
        parser.add_argument(positional[0], **positional[1])
    (helps, groups), choices = _documented_fields(cfg_class), choices or {}
    sections = {}
    for f in dataclasses.fields(cfg_class):
        title = groups.get(f.name)
        if title and title not in sections:
            sections[title] = parser.add_argument_group(title)
        parser_or_group = sections[title] if title else parser
        flag = "--" + f.name.replace("_", "-")
        # argparse expands %-formats in help; config.py's comments may say "30%"
        kw = {"dest": f.name, "default": f.default, "help": (helps.get(f.name) or " ").replace("%", "%%")}
        if f.name in choices:
            kw["choices"] = choices[f.name]
        if f.type is bool:
            parser_or_group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(f.type) is tuple:
            parser_or_group.add_argument(flag, nargs="*" if f.default == () else "+", type=typing.get_args(f.type)[0], **kw)
        else:
            parser_or_group.add_argument(flag, type=f.type, **kw)
    args = parser.parse_args(argv)
    values = vars(args)
    cfg = cfg_class(**{f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                       for f in dataclasses.fields(cfg_class)})
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
    _check_file(path)
    return _decode(path, max_pixels)


def _check_file(path):
    if not os.path.exists(path):
        raise InputError("file not found")
    if os.path.isdir(path):
        raise InputError("is a directory")
    if os.path.getsize(path) == 0:
        raise InputError("empty file (0 bytes)")


class Photo:
    """A photo as detection and alignment read it: `rgb` is the whole upright photo, decoded at its own size
    or, for a large JPEG, at 1/2, 1/4 or 1/8 of it (JPEG's own DCT scaling, several times faster than a
    full decode); `full()` gives the full-resolution pixels, decoded on first need (small faces). Boxes
    and landmarks are always in the full photo's pixels (`size`: its upright width and height)."""

    def __init__(self, rgb, size=None, load_full=None):
        self.rgb = rgb
        self.size = tuple(size) if size else (rgb.shape[1], rgb.shape[0])
        self._load_full = load_full
        self._full = rgb if load_full is None or self.size == (rgb.shape[1], rgb.shape[0]) else None

    @property
    def scale(self):
        """The decoded pixels' size over the full photo's (1: decoded whole)."""
        return self.rgb.shape[1] / self.size[0]

    @property
    def has_full(self):
        """Whether the full-resolution pixels are decoded already."""
        return self._full is not None

    def full(self):
        """The photo at full resolution (decoded now if it was not)."""
        if self._full is None:
            self._full = self._load_full()
        return self._full

    def at(self, scale):
        """(the photo resized to `scale` of its full size, the scale it has): from the reduced pixels where they
        are enough, from the full ones where not; never enlarged."""
        scale = min(scale, 1.0)
        source = self.rgb if scale <= self.scale * 1.001 else self.full()
        w, h = max(1, round(self.size[0] * scale)), max(1, round(self.size[1] * scale))
        if (w, h) != (source.shape[1], source.shape[0]):
            source = cv2.resize(source, (w, h), interpolation=cv2.INTER_AREA)
        return source, source.shape[1] / self.size[0]


def read_photo(source, max_pixels=config.MAX_IMAGE_PIXELS, min_side=config.DECODE_MIN_SIDE):
    """A path or the bytes of an upload -> Photo, read_image's checks and messages. A JPEG larger than
    `min_side` on both counts is decoded at the smallest of JPEG's 1/2, 1/4, 1/8 scales that keeps its long side
    at least `min_side`; its full pixels are decoded only if a small face needs them."""
    import io

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InputError("empty upload (0 bytes)")
        opener = lambda: io.BytesIO(data)  # noqa: E731
    else:
        _check_file(source)
        opener = lambda: source  # noqa: E731
    reduced, size = _decode(opener(), max_pixels, min_side=min_side)
    return Photo(reduced, size, load_full=lambda: _decode(opener(), max_pixels))


def _decode(source, max_pixels, min_side=None):
    """A path or a binary file object -> upright RGB uint8 array (read_image's rules). With `min_side`, a
    large JPEG is decoded reduced (read_photo) and the result is (array, the full photo's upright size)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.MAX_IMAGE_PIXELS = None  # our own, format-aware limit below
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    if im.format == "JPEG":
                        scale = (max_pixels / (w * h)) ** 0.5
                        # DCT-domain downscale by 1/2, 1/4 or 1/8; draft keeps at least the size asked,
                        # so ask for half the limit to land at or under it
                        im.draft("RGB", (max(1, int(w * scale / 2)), max(1, int(h * scale / 2))))
                    if im.size[0] * im.size[1] > max_pixels:
                        raise InputError(f"image too large ({w}x{h} pixels, limit {max_pixels:,})")
                elif min_side and im.format == "JPEG" and max(w, h) >= 2 * min_side:
                    # draft picks the smallest DCT scale that keeps at least the size asked
                    k = min_side / max(w, h)
                    im.draft("RGB", (max(1, int(np.ceil(w * k))), max(1, int(np.ceil(h * k)))))
                im.load()
                reduced = im.size
                ImageOps.exif_transpose(im, in_place=True)  # in place: an upright photo is not copied
                rgb = to_rgb8(im)
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
    if min_side is None:
        return rgb
    # a huge JPEG already decoded reduced for max_pixels is its own full size: nothing finer may be decoded
    full = (w, h) if w * h <= max_pixels else reduced
    upright = full if rgb.shape[:2] == (reduced[1], reduced[0]) else (full[1], full[0])
    return rgb, upright


def to_rgb8(im):
    """A PIL image of any mode -> RGB uint8 array (16-bit scaled down, float 0..1 scaled up, alpha composited on white)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F" and a.max() <= 1.0:  # float images are usually 0..1 (scientific and HDR tools)
            top = 1.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.ascontiguousarray(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))  # convert copies even RGB


def read_label_rows(path, required=("file", "age", "gender")):
    """The rows of a CSV with at least the `required` columns, as dicts; InputError if not."""
    import csv

    if not os.path.isfile(path):
        raise InputError(f"{path}: labels file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(required) - set(reader.fieldnames or [])
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


def add_second_look_option(parser, note=""):
    """--second-look, with one wording for demo.py, evaluate.py and calibrate.py."""
    parser.add_argument("--second-look", type=float, default=None,
                        help="with one view, a face whose gender probability is under this also reads its mirror image, and "
                             "its gender averages the two (the ages read the crop alone); 0: never (default: the "
                             "checkpoint's, stored by calibrate.py, else 0)" + note)


def add_view_options(parser, note=""):
    """--tta / --tta-zoom, the test-time views, with one wording for demo.py, evaluate.py and calibrate.py
    (evaluate.py's come from config.EvalConfig, whose comments say the same)."""
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average four views of each face: the crop, the crop enlarged by --tta-zoom, and their mirror "
                             "images; --no-tta: the crop alone (default: the views the checkpoint's calibration was fitted "
                             "for, else all four)" + note)
    parser.add_argument("--tta-zoom", type=float, default=None,
                        help=f"how much the enlarged view is enlarged; 1.0: the mirror pass only (default: the checkpoint's, "
                             f"else {config.TTA_ZOOM})")
