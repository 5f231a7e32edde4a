"""The whole pipeline, from a photo to one record per face: detect, align, predict, calibrate.

    from predictor import AgeGenderPredictor
    predictor = AgeGenderPredictor()                 # the released model, on CUDA when present
    for face in predictor("photo.jpg"):              # a path, an RGB numpy array or a PIL image
        print(face.gender, face.gender_prob, face.gender_unsure, face.age, face.age_std, face.box)
    batches = predictor.predict_many(["a.jpg", "b.jpg"], batch_size=64)   # one list of faces per photo

demo.py (the command line), serve.py (the web app and REST API), evaluate.py, calibrate.py, bench.py
and the video tracker all use this one class, so each gives the same record for the same photo.
On a CPU the network runs in OpenCV's dnn module (SFace, the released model) or in onnxruntime
(MobileNetV2), exported to ONNX in memory at start; `runtime` picks one (or a frozen TorchScript graph).
"""
import dataclasses
import os

import numpy as np
import torch

import config
from detector import align_face, find_faces, make_detector
from metrics import apply_calibration, check_age_estimate, gender_unsure, predicted_age
from models import age_estimate_of, fuse_batchnorm, load_checkpoint, normalize, second_look_of, views_of
from runtimes import NetworkRuntime
from utils import InputError, Photo, read_image, read_photo, to_rgb8

def default_device():
    """Where the network runs unless told: CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class FaceRecord:
    """One face: where it is and what the model says about it."""

    box: list  # x1, y1, x2, y2 in the photo's pixels
    score: float  # the detector's confidence
    landmarks: list  # five (x, y): eyes, nose tip, mouth corners (left of the image first)
    gender: str  # "F" or "M"
    gender_prob: float  # probability of that gender (0.5..1)
    gender_unsure: bool  # gender_prob is under the threshold for showing a gender as known: shown as "?"
    age: float  # expected real age (years since birth)
    age_std: float  # standard deviation of the predicted age distribution, calibrated when the model is
    age_distribution: list = None  # P(age = 0..100), only when asked for (distribution=True)
    # how old people would judge the face (a two-age model only; None for a model with one age output)
    apparent_age: float = None
    apparent_age_std: float = None  # its distribution's standard deviation, calibrated when the model is
    apparent_age_distribution: list = None  # P(apparent age = 0..100), only when asked for

    def to_dict(self):
        """The JSON record: the fields a model does not give (the apparent age of a one-age model, the
        distributions unless asked for) are left out, never invented."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def predict_batches(predict, batches, output="age"):
    """(gender probabilities, probabilities of the age output `output`) of every face in `batches`, as
    predict(x) gives them: the one loop over a cache's faces (train.py's validation, calibrate.py,
    evaluate.py). A batch is a normalised N x 3 x 112 x 96 tensor, or a cache loader's (x, age, gender)."""
    gender_probs, age_probs = [], []
    for batch in batches:
        out = predict(batch[0] if isinstance(batch, (tuple, list)) else batch)
        gender_probs.append(_numpy(out["gender_prob"]))
        age_probs.append(_numpy(out[output + "_prob"]))
    return np.concatenate(gender_probs), np.concatenate(age_probs)


def _numpy(a):
    return a.float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def as_photo(image):
    """A path, the bytes of an encoded photo, a utils.Photo, an RGB (or grayscale / RGBA) numpy array or a
    PIL image -> utils.Photo (a large JPEG decoded reduced, its full pixels read only where a face needs them)."""
    if isinstance(image, Photo):
        return image
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return read_photo(os.fspath(image) if isinstance(image, os.PathLike) else image)
    return Photo(as_rgb(image))


def as_rgb(image):
    """A path, an RGB (or grayscale / RGBA) numpy array or a PIL image -> upright RGB uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))  # whole at once: a reduced decode first would be thrown away
    if isinstance(image, Photo):
        return image.full()
    if isinstance(image, np.ndarray):
        from PIL import Image

        a = image
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
            if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
                return np.ascontiguousarray(a)
            if a.ndim == 3 and a.shape[2] == 1:
                a = a[:, :, 0]
            if a.dtype == np.uint16 or (a.dtype.kind == "f" and a.ndim == 2):
                return to_rgb8(Image.fromarray(a.astype(np.float32 if a.dtype.kind == "f" else np.uint16)))
            if a.dtype.kind == "f":  # float RGB(A) in 0..1
                a = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
            return to_rgb8(Image.fromarray(a.astype(np.uint8)))
        raise InputError(f"array of shape {a.shape} is not an image (expected H x W, H x W x 3 or H x W x 4)")
    if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        from PIL import ImageOps

        return to_rgb8(ImageOps.exif_transpose(image))
    raise InputError(f"cannot read an image from a {type(image).__name__}")


class AgeGenderPredictor:
    """Detect, align and predict: the whole pipeline, shared by demo.py, evaluate.py and bench.py.

    predictor(image) -> list of FaceRecord (best detection first); predictor.predict_many(images)
    batches the network across photos. `calibrated` applies the checkpoint's fitted calibration
    (calibrate.py) to the age std and the gender probability. `age_estimate` reads each age off its
    distribution as its mean or its median (None: as calibrate.py chose for the checkpoint, else the mean).
    With one view, a face whose gender the network reads with a probability under `second_look` gets a
    second look: its gender averages the crop's and its mirror image's (None: as calibrate.py stored for the
    checkpoint, else none; 0: none). The ages read the crop alone.
    A face's gender is marked unsure (FaceRecord.gender_unsure) when its probability is under
    `unsure_below` (None: the threshold calibrate.py chose for the checkpoint, else config.GENDER_UNSURE_BELOW).
    """

    def __init__(self, checkpoint=config.RELEASED_MODEL, device=None, tta=None, min_face_size=20, threshold=None, calibrated=True,
                 detector=config.DETECTOR, detector_threads=0, runtime="auto", tta_zoom=None, age_estimate=None, unsure_below=None,
                 second_look=None):
        self.device = torch.device(device or default_device())
        net, self.ckpt = load_checkpoint(checkpoint, self.device)
        tta, tta_zoom = views_of(self.ckpt, tta, tta_zoom)
        self.second_look = second_look_of(self.ckpt, second_look)
        self.net = fuse_batchnorm(net).set_tta_zoom(tta_zoom)
        self.network = NetworkRuntime(self.net, runtime, self.device, tta)  # what runs it: onnxruntime, cv2.dnn, ...
        self.runtime = self.network.name
        self._detector_args = dict(name=detector, min_face_size=min_face_size, threshold=threshold, threads=detector_threads)
        self._detector = make_detector(**self._detector_args, build=False)  # None until first used; a wrong name fails now
        self.tta = tta
        # fitted on validation data by calibrate.py: scales the shown ±std, tempers the gender probability
        self.calibration = self.ckpt.get("calibration") if calibrated else None
        self.age_estimate = check_age_estimate(age_estimate_of(self.ckpt, age_estimate))  # a wrong name fails here, not per face
        if unsure_below is None:
            unsure_below = (self.calibration or {}).get("gender_unsure_below", config.GENDER_UNSURE_BELOW)
        if not 0 <= unsure_below <= 1:
            raise ValueError(f"--unsure-below {unsure_below}: give a probability between 0 and 1 (0: never unsure)")
        self.unsure_below = float(unsure_below)

    def tracker(self, max_lost=15):
        """A FaceTracker whose steady labels are read and calibrated as this predictor reads a single face."""
        from tracker import FaceTracker

        calibration = self.calibration or {}
        return FaceTracker(max_lost=max_lost, age_std_scale=calibration.get("age_std_scale", 1.0), age_estimate=self.age_estimate,
                           unsure_below=self.unsure_below, apparent_age_std_scale=calibration.get("apparent_age_std_scale", 1.0))

    def age_output(self, age_kind):
        """(the output that reads labels of `age_kind`, the calibration factor of its ±): a two-age model's
        apparent age for apparent labels, else its age (a one-age model has only that)."""
        if age_kind == "apparent" and self.net.two_ages:
            return "apparent_age", "apparent_age_std_scale"
        return "age", "age_std_scale"

    def new_detector(self):
        """Another detector like the predictor's own, for a thread of its own (detectors are not thread-safe)."""
        return make_detector(**self._detector_args)

    @property
    def detector(self):
        """The face detector, built on first use: predicting crops already aligned (evaluate.py --cache,
        predict_crops) needs none, and loading one costs a second or two."""
        if self._detector is None:
            self._detector = make_detector(**self._detector_args)
        return self._detector

    @property
    def views(self):
        """How many views of each face are averaged: 1 (the crop), 2 (and its mirror) or 4 (and the enlarged crop)."""
        return (4 if self.net.zoom_view else 2) if self.tta else 1

    @property
    def gender_second_look(self):
        """The probability under which a face's gender gets the second look: self.second_look with one view, 0
        with test-time augmentation (whose views hold the mirror image already)."""
        return 0.0 if self.tta else self.second_look

    @torch.no_grad()
    def predict_tensor(self, x):
        """Normalised faces (N x 3 x 112 x 96 tensor) -> dict of numpy arrays, calibrated."""
        out = self.network(x)
        if self.gender_second_look:
            self._look_again(x, out["gender_prob"])
        if self.age_estimate != "mean":  # the network's own output is the mean
            for age in ("age", "apparent_age") if self.net.two_ages else ("age",):
                out[age] = predicted_age(out[f"{age}_prob"], self.age_estimate).astype(out[age].dtype)
        out["gender_prob"], out["age_std"] = apply_calibration(out["gender_prob"], out["age_std"], self.calibration)
        if self.net.two_ages:  # the apparent age's ± has a scale of its own (calibrate.py)
            scale = (self.calibration or {}).get("apparent_age_std_scale", 1.0)
            out["apparent_age_std"] = out["apparent_age_std"] * np.float32(scale)
        return out

    def _look_again(self, x, gender_prob):
        """The second look, in place: the faces read with a probability under gender_second_look average their
        gender with their mirror image's. The mirror view helps gender and not the apparent age (rows 75 and
        78 of docs/EXPERIMENTS.md), and it only changes faces that the first view reads near 0.5, so they
        alone pay for a second pass."""
        unsure = np.flatnonzero(gender_prob.max(1) < self.gender_second_look)
        if len(unsure):
            # flipped in NumPy: a torch op here wakes torch's thread pool, which then competes with cv2's for the cores
            mirrored = self.network(torch.from_numpy(np.ascontiguousarray(x.cpu().numpy()[unsure, :, :, ::-1])))["gender_prob"]
            gender_prob[unsure] = (gender_prob[unsure] + mirrored) / 2

    def predict_crops(self, crops):
        """Aligned uint8 crops (N x 112 x 96 x 3, RGB) -> dict of numpy arrays."""
        if len(crops) == 0:
            return {name: np.zeros((0, 2) if name == "gender_prob" else (0, config.NUM_AGES) if name.endswith("_prob") else 0)
                    for name in self.network.names}
        return self.predict_tensor(normalize(np.stack(crops)))

    def analyse(self, image, pad_fraction=0.0, distribution=False):
        """All faces in one photo (an RGB array or a utils.Photo): (list of FaceRecord, their aligned crops)."""
        return self.analyse_known(image, self.detector.detect(image, pad_fraction=pad_fraction), distribution)

    def analyse_known(self, image, faces, distribution=False):
        """Predict faces whose boxes and landmarks are already known (detector.Face objects, e.g. carried
        forward by the tracker between detections): (list of FaceRecord, aligned crops)."""
        crops = [align_face(image, f.landmarks) for f in faces]
        return self._records(faces, self.predict_crops(crops), 0, distribution, self.unsure_below), crops

    def __call__(self, image, pad_fraction=0.0, distribution=False):
        """All faces in one photo (a path, the bytes of a photo, an RGB array or a PIL image), as FaceRecords."""
        return self.analyse(as_photo(image), pad_fraction, distribution)[0]

    def predict_many(self, images, batch_size=64, pad_fraction=0.0, distribution=False):
        """One list of FaceRecords per image; the network runs on batches of faces from several photos."""
        return [records for records, _ in self.analyse_many(map(as_photo, images), batch_size, pad_fraction, distribution)]

    def analyse_many(self, images, batch_size=64, pad_fraction=0.0, distribution=False):
        """(FaceRecords, aligned crops) of each photo (RGB arrays or utils.Photos), the faces of all of them
        through the network in batches of `batch_size`: each photo's records are those it gets alone."""
        return self.predict_found([self.find_faces(image, pad_fraction) for image in images], batch_size, distribution)

    def find_faces(self, image, pad_fraction=0.0, detector=None):
        """(detected faces, their aligned crops) of one photo (an RGB array or a utils.Photo); `detector`:
        another instance than the predictor's own (make_detector), for a thread of its own (serve.py finds
        faces in several at once)."""
        return find_faces(image, detector or self.detector, pad_fraction)

    def predict_found(self, found, batch_size=64, distribution=False):
        """(FaceRecords, crops) of each photo's find_faces() result, the faces of all of them through the
        network together, in batches of `batch_size` (serve.py batches requests so)."""
        crops = [c for _, photo_crops in found for c in photo_crops]
        parts = [self.predict_crops(crops[s : s + batch_size]) for s in range(0, len(crops), batch_size)]
        pred = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else self.predict_crops([])
        out, start = [], 0
        for faces, photo_crops in found:
            out.append((self._records(faces, pred, start, distribution, self.unsure_below), photo_crops))
            start += len(faces)
        return out

    @staticmethod
    def _records(faces, pred, start, distribution, unsure_below):
        records = []
        unsure = gender_unsure(pred["gender_prob"], unsure_below)
        for i, f in enumerate(faces):
            k = start + i
            p_male = float(pred["gender_prob"][k, 1])
            records.append(FaceRecord(
                box=[round(float(v), 1) for v in f.box],
                score=round(f.score, 4),
                landmarks=[[round(float(x), 1), round(float(y), 1)] for x, y in f.landmarks],
                gender="M" if p_male >= 0.5 else "F",
                gender_prob=round(max(p_male, 1 - p_male), 4),
                gender_unsure=bool(unsure[k]),
                age=round(float(pred["age"][k]), 1),
                age_std=round(float(pred["age_std"][k]), 1),
                age_distribution=[round(float(p), 6) for p in pred["age_prob"][k]] if distribution else None,
                **({"apparent_age": round(float(pred["apparent_age"][k]), 1),
                    "apparent_age_std": round(float(pred["apparent_age_std"][k]), 1),
                    "apparent_age_distribution": [round(float(p), 6) for p in pred["apparent_age_prob"][k]] if distribution else None}
                   if "apparent_age" in pred else {}),
            ))
        return records
