"""Real-world imaging conditions on aligned faces: what training augments with and what the
hard-conditions validation is made of.

    from conditions import turn_of, degrade, yaw_matrix, hard_conditions
    turn = turn_of(landmarks)                    # (n, 5, 2) -> (n,): 0 frontal, >= TURNED: turned away
    face = degrade(face, "jpeg", rng)            # one condition on a uint8 112x96 RGB crop
    faces, names = hard_conditions(cache_faces, turn, seed=0)   # the hard-conditions set (evaluate.py --conditions)
    face = beside(face, other_face, rng)         # another person's face cheek to cheek with this one

The photos people take are smaller, blurrier, more compressed, darker or brighter and more often
turned away than UTKFace's studio-like chips. Each condition here is a function of one aligned crop
(plus a random generator), so the training augmentation (data_gen.augment) and the hard-conditions
validation (evaluate.py --conditions hard) apply the same kinds of damage; validation draws from wider,
harsher ranges and from a fixed seed, so the same files give the same set every time.

A turned face is aligned by the demo as any other: the five landmarks are fitted onto the frontal
template by a similarity, which pushes a turned face to one side of the crop with background beside
it. `yaw_matrix` makes such crops from frontal ones: the face, taken as a plane, is turned about the
vertical axis through the nose (a homography), the nose landmark is moved as a real nose (which stands
out of that plane) moves, and the five moved landmarks are fitted back onto the template exactly as
`detector.align_face` fits a detected face.

People photographed together stand close: cheek to cheek, one a little in front of the other. The
demo's crop of one then shows part of the other's face beside it. `beside` puts another aligned face
there, so training can learn to read the face in the middle, and `neighbour_conditions` is the
validation set of that (evaluate.py --conditions neighbour).
"""
import cv2
import numpy as np

import config
from detector import similarity_transform

# The turn measure (turn_of) from which a face counts as turned away: the nose's offset from the eyes'
# midpoint is 30% of the eye distance or more (about 30 degrees of yaw).
TURNED = 0.3
# How far the nose tip stands out of the plane of the eyes and mouth, in eye distances (adult average).
NOSE_DEPTH = 0.55
# The conditions of the hard-conditions validation, one per face (evaluate.py --conditions hard).
HARD_CONDITIONS = ("small", "jpeg", "blur", "gray", "dark", "bright", "occluded")
HARD_SEED = 2024
# How far a neighbour's face stands from the face's own, centre to centre, in crop widths: from cheek to
# cheek over the far cheek (0.45) to beside it with a gap (0.8); the validation set keeps to the close half.
NEIGHBOUR_SHIFT = (0.45, 0.8)
NEIGHBOUR_SHIFT_HARD = (0.45, 0.6)

_REF = np.asarray(config.REFERENCE_LANDMARKS, dtype=np.float64)
_GRAY = np.array([0.299, 0.587, 0.114])


def turn_of(landmarks):
    """How far each face is turned away, from its five landmarks (n, 5, 2): the nose's offset from the
    eyes' midpoint, along the eye axis, over the eye distance (0 frontal; about 0.3 at 30 degrees of yaw)."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    axis = pts[:, 1] - pts[:, 0]
    iod = np.maximum(np.linalg.norm(axis, axis=1), 1e-6)
    offset = ((pts[:, 2] - (pts[:, 0] + pts[:, 1]) / 2) * axis).sum(1) / iod
    return np.abs(offset) / iod


def yaw_matrix(yaw_deg, focal=2.0):
    """The 3x3 map from a frontal aligned crop to the demo's aligned crop of that face turned by
    `yaw_deg` (positive: the image-right half turns away), and the moved landmarks (5, 2).

    focal: the camera's focal length in crop widths (2: a portrait lens at arm's length)."""
    t = np.radians(yaw_deg)
    f = focal * config.IMAGE_W
    cx, cy = _REF[2]  # turn about the vertical axis through the nose
    shift, back = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]]), np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1.0]])
    turn = back @ np.array([[f * np.cos(t), 0, 0], [0, f, 0], [np.sin(t), 0, f]]) @ shift
    pts = np.c_[_REF, np.ones(5)] @ turn.T
    pts = pts[:, :2] / pts[:, 2:]
    iod = np.linalg.norm(_REF[1] - _REF[0])
    pts[2, 0] += NOSE_DEPTH * iod * np.sin(t)  # the nose tip moves towards the side that turns away
    fit = np.vstack([similarity_transform(pts, _REF), [0, 0, 1]]).astype(np.float64)
    return fit @ turn, (np.c_[pts, np.ones(5)] @ fit.T)[:, :2]


def jpeg(face, quality):
    ok, buf = cv2.imencode(".jpg", face[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1] if ok else face


def blur(face, sigma, motion=0.0, angle=0.0):
    """Defocus (Gaussian, sigma in pixels) or, with motion > 0, a straight motion streak that long."""
    if motion > 0:
        k = int(np.ceil(motion)) | 1
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2, :] = 1
        rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), angle, 1.0)
        kernel = cv2.warpAffine(kernel, rot, (k, k))
        return cv2.filter2D(face, -1, kernel / max(kernel.sum(), 1e-6), borderType=cv2.BORDER_REPLICATE)
    return cv2.GaussianBlur(face, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


def sharpen(face, amount, sigma=1.0):
    """An unsharp mask: the face as a large, sharp photo gives it once shrunk to the crop, crisper than the
    cached crops, which come from faces of about the crop's size or smaller (UTKFace's 200x200 photos)."""
    soft = cv2.GaussianBlur(face, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    return cv2.addWeighted(face, 1.0 + amount, soft, -amount, 0)


def light(face, gamma, gain=1.0):
    """Under- (gamma > 1, gain < 1) or over-exposure (gamma < 1), as a lookup table on uint8 pixels."""
    lut = np.clip(255.0 * gain * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
    return cv2.LUT(face, lut)


def small(face, height):
    """The face as the detector sees it in a photo where it is `height` pixels tall, blown up again."""
    f = height / face.shape[0]
    tiny = cv2.resize(face, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    return cv2.resize(tiny, (face.shape[1], face.shape[0]), interpolation=cv2.INTER_LINEAR)


def gray(face):
    return np.repeat((face.astype(np.float32) @ _GRAY).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def occlude(face, rng, area=(0.1, 0.25)):
    """A flat patch over part of the face (a hand, a microphone, another head), its colour random."""
    h, w = face.shape[:2]
    a = rng.uniform(*area) * h * w
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    eh, ew = int(min(h, np.sqrt(a * aspect))), int(min(w, np.sqrt(a / aspect)))
    y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    out = face.copy()
    out[y:y + eh, x:x + ew] = rng.integers(0, 256, 3)
    return out


def beside(face, other, rng, shift=NEIGHBOUR_SHIFT):
    """`other` (another aligned crop, same size) standing beside `face`: moved sideways by `shift` crop
    widths (either side), up or down by up to 8%, scaled 0.9-1.1 and tilted up to 10 degrees, and shown
    over every pixel past the midline between the two faces' centres (nearer it than the face's own
    centre). Same size and dtype as `face`; what lies on the face's side of that line is untouched."""
    h, w = face.shape[:2]
    dx = rng.choice([-1.0, 1.0]) * rng.uniform(*shift) * w
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
    m[:, 2] += (dx, rng.uniform(-0.08, 0.08) * h)
    moved = cv2.warpAffine(other, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    x = np.arange(w)
    past = x > w / 2 + dx / 2 if dx > 0 else x < w / 2 + dx / 2
    out = face.copy()
    out[:, past] = moved[:, past]
    return out


def degrade(face, condition, rng, harsh=False):
    """One condition on a uint8 aligned crop (H x W x 3 RGB); `harsh`: the validation's ranges."""
    if condition == "small":  # faces 24-40 px tall in the photo (validation); 30-60 (training)
        return small(face, rng.uniform(24, 40) if harsh else rng.uniform(30, 60))
    if condition == "jpeg":
        return jpeg(face, rng.integers(8, 20) if harsh else rng.integers(15, 60))
    if condition == "blur":
        if rng.random() < 0.5:
            return blur(face, rng.uniform(1.5, 3.0) if harsh else rng.uniform(0.6, 2.2))
        return blur(face, 0, motion=rng.uniform(7, 13) if harsh else rng.uniform(3, 10), angle=rng.uniform(0, 180))
    if condition == "gray":
        return gray(face)
    if condition == "dark":
        return light(face, rng.uniform(1.8, 2.6) if harsh else rng.uniform(1.3, 2.2), rng.uniform(0.35, 0.6) if harsh else rng.uniform(0.5, 0.9))
    if condition == "bright":
        return light(face, rng.uniform(0.3, 0.45) if harsh else rng.uniform(0.45, 0.8), rng.uniform(1.1, 1.4) if harsh else 1.0)
    if condition == "occluded":
        return occlude(face, rng, (0.15, 0.3) if harsh else (0.05, 0.2))
    if condition == "noise":
        sd = rng.uniform(6, 18)
        return np.clip(face + rng.normal(0, sd, face.shape), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown condition '{condition}'")


# What training draws from (data_gen.augment --hard-aug): the validation's conditions but "gray" (the
# colour jitter already turns 10% grey) and "small" (already its own low-resolution step), plus noise.
TRAIN_CONDITIONS = ("jpeg", "blur", "dark", "bright", "noise")


def hard_conditions(faces, turn, seed=HARD_SEED):
    """The hard-conditions set from aligned faces (n, H, W, 3 uint8) and their turn measure (n,).

    Every face turned away (turn >= TURNED) is kept as it is, under "turned": real turned faces, as
    the demo aligns them. Each other face gets one of HARD_CONDITIONS, in turn by a seeded permutation
    (so each condition has a near-equal share), with its own seeded parameters. Returns the new faces
    and each one's condition name; the same faces and seed give the same set."""
    rng = np.random.default_rng(seed)
    n = len(faces)
    names = np.empty(n, dtype=object)
    order = rng.permutation(n)
    names[order] = [HARD_CONDITIONS[k % len(HARD_CONDITIONS)] for k in range(n)]
    names[np.asarray(turn) >= TURNED] = "turned"
    out = np.empty((n,) + faces.shape[1:], np.uint8)
    for i in range(n):
        face_rng = np.random.default_rng([seed, i])
        out[i] = faces[i] if names[i] == "turned" else degrade(np.asarray(faces[i]), names[i], face_rng, harsh=True)
    return out, names.astype(str)


# evaluate.py --conditions sharp / soft: every face made sharper (an unsharp mask of amount 1, sigma 1 px) or
# softer (shrunk to half and blown up again); a model that reads age from the face, not from how crisp its
# photo is, gives the same faces the same ages in both
SHARPNESS = {"sharp": lambda face: sharpen(face, 1.0, 1.0), "soft": lambda face: small(face, face.shape[0] / 2)}


def sharpness_conditions(faces, kind):
    """Every face made sharper or softer (SHARPNESS[kind]); returns the new faces and their condition name."""
    return np.stack([SHARPNESS[kind](np.asarray(f)) for f in faces]), np.full(len(faces), kind)


def neighbour_conditions(faces, seed=HARD_SEED):
    """Every face with another face of the set beside it, cheek to cheek (`beside`, NEIGHBOUR_SHIFT_HARD):
    the faces are put in a seeded random order, and each one's neighbour is the face before it in that
    order (the last lends itself to the first), so nobody stands beside themselves and each face lends
    itself once. Returns the new faces and their condition name; the same faces and seed give the same set."""
    n = len(faces)
    if n < 2:
        raise ValueError(f"a neighbour needs another face: the set has {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    other = np.roll(perm, 1)  # a cyclic shift of a permutation: nobody stands beside themselves
    partner = np.empty(n, np.int64)
    partner[perm] = other
    out = np.empty((n,) + faces.shape[1:], np.uint8)
    for i in range(n):
        out[i] = beside(np.asarray(faces[i]), np.asarray(faces[partner[i]]), np.random.default_rng([seed, i]), NEIGHBOUR_SHIFT_HARD)
    return out, np.full(n, "neighbour")
