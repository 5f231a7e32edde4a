"""predictor.py: the Python API (paths, arrays, PIL images) and batching across photos."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

import config
import demo
from conftest import ASTRONAUT
from predictor import AgeGenderPredictor, FaceRecord
from utils import read_image


@pytest.fixture(scope="module")
def predictor():
    return AgeGenderPredictor(device="cpu")


def test_api_gives_the_same_records_for_path_array_and_pil(predictor):
    by_path = predictor(ASTRONAUT)
    by_array = predictor(read_image(ASTRONAUT))
    by_pil = predictor(Image.open(ASTRONAUT))
    assert len(by_path) == 1 and by_path == by_array == by_pil
    face = by_path[0]
    assert isinstance(face, FaceRecord) and face.gender in ("F", "M") and 0.5 <= face.gender_prob <= 1
    assert len(face.box) == 4 and np.asarray(face.landmarks).shape == (5, 2) and face.age_distribution is None
    with_dist = predictor(ASTRONAUT, distribution=True)[0]
    assert len(with_dist.age_distribution) == 101 and sum(with_dist.age_distribution) == pytest.approx(1, abs=1e-3)
    gray = predictor(np.asarray(Image.open(ASTRONAUT).convert("L")))  # a 2-D array is grayscale
    assert len(gray) == 1
    with pytest.raises(demo.InputError):
        predictor(np.zeros((5, 5, 7), np.uint8))


def test_predict_many_equals_one_by_one(predictor):
    photos = [ASTRONAUT, os.path.join(config.ROOT, "images", "collage.jpg"), os.path.join(config.ROOT, "images", "grace_hopper.jpg")]
    many = predictor.predict_many(photos, batch_size=2)
    single = [predictor(p) for p in photos]
    assert [len(m) for m in many] == [1, 3, 1]
    for m, s in zip(many, single):
        for a, b in zip(m, s):
            assert a.box == b.box and a.gender == b.gender
            assert a.age == pytest.approx(b.age, abs=0.15) and a.gender_prob == pytest.approx(b.gender_prob, abs=2e-3)


def test_predict_batches_gives_what_one_pass_gives(predictor):
    """The loop over a cache's faces (train.py, calibrate.py, evaluate.py) reads tensors and loader tuples alike."""
    from models import normalize
    from predictor import predict_batches

    crops = np.random.default_rng(0).integers(0, 256, (5, 112, 96, 3), dtype=np.uint8)
    whole = predictor.predict_tensor(normalize(crops))
    batches = [normalize(crops[:2]), (normalize(crops[2:]), None, None)]
    gender, age = predict_batches(predictor.predict_tensor, batches, "age")
    assert gender.shape == (5, 2) and age.shape == (5, 101)
    assert np.abs(gender - whole["gender_prob"]).max() < 1e-5 and np.abs(age - whole["age_prob"]).max() < 1e-5


def test_second_look_averages_gender_with_the_mirror_image_and_leaves_the_ages(predictor):
    """A face read under the second-look probability gets its gender from the crop and its mirror image (what the
    mirror views of test-time augmentation give), its ages from the crop alone; a face read above it is left as it is."""
    from models import normalize

    crops = np.random.default_rng(1).integers(0, 256, (6, 112, 96, 3), dtype=np.uint8)
    crops[0] = predictor.find_faces(read_image(ASTRONAUT))[1][0]  # a real face among the noise
    x = normalize(crops)
    common = dict(device="cpu", runtime="torch", calibrated=False, tta=False)
    once = AgeGenderPredictor(second_look=0.0, **common).predict_tensor(x)
    always = AgeGenderPredictor(second_look=1.0, **common).predict_tensor(x)
    mirror = AgeGenderPredictor(device="cpu", runtime="torch", calibrated=False, tta=True, tta_zoom=1.0).predict_tensor(x)
    assert np.allclose(always["gender_prob"], mirror["gender_prob"], atol=1e-5)
    assert not np.allclose(once["gender_prob"], mirror["gender_prob"], atol=1e-3)
    for key in ("age_prob", "apparent_age_prob", "age", "apparent_age_std"):
        assert np.allclose(always[key], once[key], atol=1e-5)
    assert not np.allclose(always["age_prob"], mirror["age_prob"], atol=1e-4)  # the ages really read one view
    confidence = once["gender_prob"].max(1)
    below = float(np.median(confidence))
    some = AgeGenderPredictor(second_look=below, **common).predict_tensor(x)["gender_prob"]
    looked = confidence < below
    assert 0 < looked.sum() < len(x)
    assert np.allclose(some[looked], mirror["gender_prob"][looked], atol=1e-5) and np.array_equal(some[~looked], once["gender_prob"][~looked])


def test_a_portrait_reads_the_same_at_every_size(predictor, tmp_path):
    """The same studio-like portrait saved as a JPEG at 640, 1,500, 3,000 and 4,000 px: one face at each size and
    the same prediction within its ± (the large ones decoded reduced, their faces shrunk before the warp)."""
    from conftest import UTK, utk_rows

    row = utk_rows("val", 1, seed=11)[0]
    img = cv2.copyMakeBorder(read_image(os.path.join(UTK, row["file"])), 60, 60, 60, 60, cv2.BORDER_REPLICATE)
    faces = {}
    for side in (640, 1500, 3000, 4000):
        path = tmp_path / f"portrait_{side}.jpg"
        Image.fromarray(cv2.resize(img, (side, side), interpolation=cv2.INTER_CUBIC)).save(path, quality=92)
        records = predictor(str(path))
        assert len(records) == 1, (side, len(records))
        faces[side] = records[0]
    small = faces[640]
    for side, face in faces.items():
        assert abs(face.age - small.age) <= small.age_std and face.gender == small.gender
        assert np.allclose(np.asarray(face.box) * 640 / side, small.box, atol=12)  # boxes in each photo's own pixels


def test_inference_does_not_load_the_training_loader():
    """A photo's way through inference reads predictor -> detector -> runtimes: the pixel normalisation it
    shares with training lives in models.py, so importing predictor leaves data_gen (and its loaders) out."""
    import subprocess
    import sys

    code = "import sys, predictor; print(sorted(m for m in ('data_gen', 'train', 'conditions') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=config.ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
