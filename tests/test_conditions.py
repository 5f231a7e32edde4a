"""conditions.py: the real-condition damage, turned faces and neighbours."""
import os

import cv2
import numpy as np
import pytest
import torch

import conditions
import config
from conftest import UTK, utk_rows
from data_gen import augment
from detector import FaceDetector, align_face
from utils import read_image

REF = np.asarray(config.REFERENCE_LANDMARKS)


@pytest.fixture(scope="module")
def real_faces():
    """Aligned crops of 6 real UTKFace test photos and the detector, for landmark checks."""
    det = FaceDetector(min_face_size=20)
    crops = []
    for r in utk_rows("test", 12, seed=3):
        rgb = read_image(os.path.join(UTK, r["file"]))
        faces = det.detect(rgb, pad_fraction=0.25)
        if faces and conditions.turn_of(faces[0].landmarks[None])[0] < 0.15:
            crops.append(align_face(rgb, faces[0].landmarks))
    assert len(crops) >= 6
    return crops[:6], det


def landmarks_in_crop(det, crop):
    """The detector's landmarks on an aligned crop (found at twice its size, with a margin)."""
    faces = det.detect(cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR), pad_fraction=0.3)
    return faces[0].landmarks / 2 if faces else None


def test_turn_measure():
    assert conditions.turn_of(REF[None])[0] < 0.01  # the template is frontal
    for yaw, lo, hi in ((15, 0.1, 0.25), (30, 0.3, 0.45), (-40, 0.45, 0.65)):
        assert lo <= conditions.turn_of(conditions.yaw_matrix(yaw)[1][None])[0] <= hi
    # the measure ignores the face's size, position and roll
    pts = conditions.yaw_matrix(30)[1]
    rot = cv2.getRotationMatrix2D((10, 20), 35, 2.5)
    moved = np.c_[pts, np.ones(5)] @ rot.T + 100
    assert conditions.turn_of(moved[None])[0] == pytest.approx(conditions.turn_of(pts[None])[0], abs=1e-9)


@pytest.mark.parametrize("condition", conditions.HARD_CONDITIONS + conditions.TRAIN_CONDITIONS)
def test_condition_keeps_shape_range_and_landmarks(real_faces, condition):
    crops, det = real_faces
    rng = np.random.default_rng(0)
    moved = []
    for crop in crops:
        for harsh in (False, True):
            out = conditions.degrade(crop, condition, rng, harsh=harsh)
            assert out.shape == crop.shape and out.dtype == np.uint8
            assert 0 < np.abs(out.astype(int) - crop).mean() or condition == "gray" and crop.std(2).mean() < 1
        before, after = landmarks_in_crop(det, crop), landmarks_in_crop(det, conditions.degrade(crop, condition, rng))
        if before is not None and after is not None:
            moved.append(np.linalg.norm(after - before, axis=1).mean())
    # a photometric condition leaves the face where it was: the landmarks stay within a few pixels
    # (inter-ocular distance 35 px); a patch may hide a landmark, which the detector then guesses
    assert len(moved) >= 4
    assert np.mean(moved) < (4.5 if condition == "occluded" else 2.5)


def test_turned_crop_matches_its_landmarks(real_faces):
    """The warp of yaw_matrix moves a real face's landmarks where the matrix says they go."""
    crops, det = real_faces
    for yaw in (-25, 20):
        m, _ = conditions.yaw_matrix(yaw)
        errors = []
        for crop in crops:
            before = landmarks_in_crop(det, crop)
            after = landmarks_in_crop(det, cv2.warpPerspective(crop, m, (config.IMAGE_W, config.IMAGE_H), borderMode=cv2.BORDER_REPLICATE))
            if before is None or after is None:
                continue
            p = np.c_[before, np.ones(5)] @ m.T
            errors.append(np.linalg.norm(after - p[:, :2] / p[:, 2:], axis=1).mean())
        assert len(errors) >= 4 and np.mean(errors) < 2.0
        # the turned face is pushed sideways in the crop, as the demo aligns a turned face
        assert abs(m[0, 2]) > 1.0


def test_augment_with_conditions_keeps_shapes_and_ranges(real_faces):
    crops, _ = real_faces
    raw = np.stack(crops * 6)
    plain = augment(raw, np.random.default_rng(1))
    x = augment(raw, np.random.default_rng(1), hard=1.0, pose=1.0)
    assert x.shape == plain.shape == (len(raw), 3, config.IMAGE_H, config.IMAGE_W) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    lo = (0 - np.array(config.IMAGENET_MEAN)) / np.array(config.IMAGENET_STD)
    hi = (1 - np.array(config.IMAGENET_MEAN)) / np.array(config.IMAGENET_STD)
    for c in range(3):  # colour jitter may push a pixel past 0..255 a little, never far
        assert x[:, c].min() >= lo[c] * 1.6 - 0.5 and x[:, c].max() <= hi[c] * 1.6 + 0.5
    assert (x - plain).abs().mean() > 0.05  # the conditions did something
    assert torch.equal(x, augment(raw, np.random.default_rng(1), hard=1.0, pose=1.0))  # and reproducibly
    # --hard-harsh: the validation's harsher ranges take the faces further from the undamaged ones, in range
    harsh = augment(raw, np.random.default_rng(1), hard=1.0, pose=1.0, harsh=1.0)
    assert harsh.shape == x.shape and torch.isfinite(harsh).all()
    assert (harsh - plain).abs().mean() > 1.2 * (x - plain).abs().mean()
    assert torch.equal(x, augment(raw, np.random.default_rng(1), hard=1.0, pose=1.0, harsh=0.0))


def test_clean_view_is_the_same_face_before_the_conditions(real_faces):
    crops, _ = real_faces
    raw = np.stack(crops * 6)
    x, clean = augment(raw, np.random.default_rng(1), hard=1.0, pose=1.0, clean_view=True)
    # what the network sees does not change when the teachers get their own view
    assert torch.equal(x, augment(raw, np.random.default_rng(1), hard=1.0, pose=1.0))
    assert clean.shape == x.shape and clean.dtype == x.dtype and torch.isfinite(clean).all()
    # the clean view does not depend on the conditions: the same faces, flipped, rotated and shifted alike
    _, clean_plain = augment(raw, np.random.default_rng(1), clean_view=True)
    assert torch.equal(clean, clean_plain)
    # and it is the face the student sees, before what the conditions did to it: a turned, damaged face is
    # nearer its own clean view than the clean views of the same photo placed otherwise (its other copies)
    d = (x[:, None] - clean[None]).abs().mean(dim=(2, 3, 4))
    same_photo = (torch.arange(len(raw))[:, None] - torch.arange(len(raw))[None]) % len(crops) == 0
    others = torch.where(same_photo & ~torch.eye(len(raw), dtype=bool), d, torch.inf).min(1).values
    assert (d.diagonal() < others).float().mean() > 0.8, (d.diagonal(), others)
    # within the normalised range of an undamaged pixel
    lo = (0 - np.array(config.IMAGENET_MEAN)) / np.array(config.IMAGENET_STD)
    hi = (1 - np.array(config.IMAGENET_MEAN)) / np.array(config.IMAGENET_STD)
    for c in range(3):
        assert clean[:, c].min() >= lo[c] - 1e-5 and clean[:, c].max() <= hi[c] + 1e-5


def test_hard_conditions_set_is_reproducible():
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (70, config.IMAGE_H, config.IMAGE_W, 3), dtype=np.uint8)
    turn = np.where(np.arange(70) % 10 == 0, 0.5, 0.1)
    a, names = conditions.hard_conditions(faces, turn)
    b, names_b = conditions.hard_conditions(faces.copy(), turn)
    assert np.array_equal(a, b) and list(names) == list(names_b)
    c, names_c = conditions.hard_conditions(faces, turn, seed=1)
    assert not np.array_equal(a, c)
    assert set(names[turn >= conditions.TURNED]) == {"turned"}
    assert np.array_equal(a[turn >= conditions.TURNED], faces[turn >= conditions.TURNED])  # real turned faces, untouched
    counts = {k: int((names == k).sum()) for k in conditions.HARD_CONDITIONS}
    assert max(counts.values()) - min(counts.values()) <= 3 and sum(counts.values()) == 63


def test_a_neighbour_stands_beside_the_face_not_over_it(real_faces):
    crops, _ = real_faces
    face, other = crops[0], crops[1]
    for seed in range(8):
        out = conditions.beside(face, other, np.random.default_rng(seed))
        assert out.shape == face.shape and out.dtype == np.uint8
        changed = (out != face).any(axis=(0, 2))  # by column
        # the neighbour covers one side only, from some column to the edge, never the face's own eyes
        assert changed.any() and (changed[: config.IMAGE_W // 2].any() != changed[config.IMAGE_W // 2:].any())
        side = changed[: config.IMAGE_W // 2].any()
        cols = np.flatnonzero(changed)
        assert (cols.min() == 0) if side else (cols.max() == config.IMAGE_W - 1)  # from the crop's edge
        eye_x = REF[0, 0] if side else REF[1, 0]
        assert (np.abs(cols - eye_x) > 2).all()
        assert np.array_equal(out, conditions.beside(face, other, np.random.default_rng(seed)))  # reproducibly


def test_neighbour_set_is_reproducible_and_nobody_stands_beside_themselves():
    # each face one flat colour: the pixels of face i's neighbour show which face lent itself
    n = 9
    faces = np.repeat(np.arange(10, 10 + 20 * n, 20, dtype=np.uint8), config.IMAGE_H * config.IMAGE_W * 3)
    faces = faces.reshape(n, config.IMAGE_H, config.IMAGE_W, 3)
    a, names = conditions.neighbour_conditions(faces)
    assert np.array_equal(a, conditions.neighbour_conditions(faces.copy())[0]) and set(names) == {"neighbour"}
    assert not np.array_equal(a, conditions.neighbour_conditions(faces, seed=1)[0])
    lenders = []
    for i in range(n):
        values = set(np.unique(a[i]).tolist()) - {int(faces[i, 0, 0, 0])}
        assert len(values) == 1  # the face and exactly one other
        lenders.append((values.pop() - 10) // 20)
    assert sorted(lenders) == list(range(n)) and all(j != i for i, j in enumerate(lenders))  # each lends itself once
    with pytest.raises(ValueError, match="needs another face"):
        conditions.neighbour_conditions(faces[:1])


def test_augment_with_neighbours(real_faces):
    crops, _ = real_faces
    raw = np.stack(crops * 4)
    plain, clean_plain = augment(raw, np.random.default_rng(1), clean_view=True)
    x, clean = augment(raw, np.random.default_rng(1), neighbour=1.0, clean_view=True)
    assert x.shape == plain.shape and torch.isfinite(x).all()
    # every face got someone beside it, on one side: a band of columns from an edge changed, not the middle
    by_column = (x - plain).abs().mean(dim=(1, 2))  # (n, W)
    middle = slice(config.IMAGE_W // 2 - 8, config.IMAGE_W // 2 + 8)
    assert (by_column[:, middle].max(1).values < 1e-6).float().mean() > 0.9
    assert (torch.maximum(by_column[:, 0], by_column[:, -1]) > 0.05).all()
    # the teachers' clean view has nobody beside the face, and without the option nothing is drawn
    assert torch.equal(clean, clean_plain)
    assert torch.equal(plain, augment(raw, np.random.default_rng(1), neighbour=0.0))


def _detail(faces):
    """High-frequency energy: the mean absolute Laplacian of the grey faces."""
    return float(np.mean([np.abs(cv2.Laplacian(cv2.cvtColor(np.asarray(f), cv2.COLOR_RGB2GRAY), cv2.CV_32F)).mean() for f in faces]))


def test_sharp_and_soft_sets_move_detail_opposite_ways(real_faces):
    crops, _ = real_faces
    faces = np.stack(crops)
    sharp, names = conditions.sharpness_conditions(faces, "sharp")
    soft, soft_names = conditions.sharpness_conditions(faces, "soft")
    assert sharp.shape == soft.shape == faces.shape and sharp.dtype == np.uint8
    assert list(names) == ["sharp"] * len(faces) and list(soft_names) == ["soft"] * len(faces)
    assert _detail(sharp) > 1.3 * _detail(faces) > 1.3 * 1.3 * _detail(soft)
    # the same face: sharpening changes edges, not the picture (mean brightness within a grey level)
    assert np.abs(sharp.astype(float).mean((1, 2, 3)) - faces.astype(float).mean((1, 2, 3))).max() < 1.5


def test_augment_sharpens_only_faces_at_full_resolution(real_faces):
    crops, _ = real_faces
    raw = np.stack(crops * 8)
    plain = augment(raw, np.random.default_rng(4))
    assert torch.equal(plain, augment(raw, np.random.default_rng(4), sharp=0.0))  # off: the same batches as before
    x = augment(raw, np.random.default_rng(4), sharp=1.0)
    changed = (x - plain).abs().flatten(1).amax(1) > 1e-6
    # the draws before the sharpening are the same, so the faces made small stay as they were
    from data_gen import _draw
    d = _draw(np.random.default_rng(4), len(raw), config.IMAGE_H, config.IMAGE_W, config.AUG_SCALE, False, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    assert torch.equal(changed, torch.from_numpy(d.lowres == 1)) and changed.any() and not changed.all()
    assert torch.equal(x, augment(raw, np.random.default_rng(4), sharp=1.0))  # reproducibly
