"""utils.py: reading awkward images (grayscale, CMYK, alpha, 16-bit, EXIF rotation, huge, broken)."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

import config
from conftest import png_header
from utils import InputError, Photo, read_image, read_photo


def face_photo():
    return np.asarray(Image.open(os.path.join(config.ROOT, "images", "astronaut.jpg")).convert("RGB"))


def test_grayscale_cmyk_alpha_16bit(tmp_path):
    rgb = face_photo()
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:50, :50, 3] = 0  # a transparent corner
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    cv2.imwrite(str(tmp_path / "deep.png"), (rgb[:, :, ::-1].astype(np.uint16) * 257))
    cv2.imwrite(str(tmp_path / "deep_gray.png"), (rgb[:, :, 0].astype(np.uint16) * 257))
    Image.fromarray(rgb[:, :, 0].astype(np.float32) / 255).save(tmp_path / "float.tif")  # 32-bit float, 0..1
    for name in ("gray.png", "cmyk.jpg", "alpha.png", "deep.png", "deep_gray.png", "float.tif"):
        img = read_image(str(tmp_path / name))
        assert img.dtype == np.uint8 and img.shape == rgb.shape, name
    assert np.abs(read_image(str(tmp_path / "deep.png")).astype(int) - rgb).max() <= 1  # 16-bit scaled, not clipped
    assert np.abs(read_image(str(tmp_path / "float.tif"))[:, :, 1].astype(int) - rgb[:, :, 0]).max() <= 1  # not black
    assert (read_image(str(tmp_path / "alpha.png"))[:50, :50] == 255).all()  # composited on white
    assert np.abs(read_image(str(tmp_path / "cmyk.jpg")).astype(int) - rgb).mean() < 12


def test_exif_rotation_is_applied(tmp_path):
    rgb = face_photo()[:, :400]  # 512 x 400: not square, so a rotation shows in the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif)
    img = read_image(str(tmp_path / "rot.jpg"))
    assert img.shape[:2] == (400, 512)
    assert np.abs(img.astype(int) - np.rot90(rgb, -1)).mean() < 8


def test_bad_files_give_a_reason(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(face_photo()).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    (tmp_path / "bomb.png").write_bytes(png_header(40000, 30000))  # 1.2 gigapixels claimed
    cases = {"trunc.jpg": "truncated", "empty.jpg": "empty", "text.jpg": "not an image", "bomb.png": "too large",
             "missing.jpg": "not found"}
    for name, words in cases.items():
        with pytest.raises(InputError, match=words):
            read_image(str(tmp_path / name))


def test_huge_jpeg_is_decoded_downscaled(tmp_path):
    big = cv2.resize(face_photo(), (3000, 3000))
    Image.fromarray(big).save(tmp_path / "big.jpg")
    img = read_image(str(tmp_path / "big.jpg"), max_pixels=1_000_000)
    assert img.shape[0] * img.shape[1] <= 1_000_000 and img.shape[0] >= 375


def test_large_jpeg_is_read_reduced_with_its_full_pixels_on_demand(tmp_path):
    """A 4000x3000 JPEG is decoded at 1/4 (1000x750, DCT scaling) with its full size known; its full pixels are
    decoded only when asked for, and then equal read_image's; the same from the bytes of an upload, and an
    EXIF-rotated one reports its upright size. Photos under twice config.DECODE_MIN_SIDE are decoded whole."""
    big = cv2.resize(face_photo(), (4000, 3000), interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=90)
    for photo in (read_photo(str(path)), read_photo(path.read_bytes())):
        assert photo.rgb.shape == (750, 1000, 3) and photo.size == (4000, 3000) and photo.scale == 0.25
        assert not photo.has_full
        assert np.array_equal(photo.full(), read_image(str(path))) and photo.has_full
        half, scale = photo.at(0.5)
        assert half.shape == (1500, 2000, 3) and scale == 0.5  # finer than the reduced pixels: from the full ones
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(big).save(tmp_path / "rot.jpg", exif=exif)
    rotated = read_photo(str(tmp_path / "rot.jpg"))
    assert rotated.size == (3000, 4000) and rotated.rgb.shape == (1000, 750, 3) and rotated.full().shape == (4000, 3000, 3)
    small = tmp_path / "small.jpg"
    Image.fromarray(cv2.resize(big, (1800, 1350))).save(small)
    assert read_photo(str(small)).scale == 1 and Photo(big).at(1.0)[0] is big
    with pytest.raises(InputError, match="truncated"):
        read_photo(path.read_bytes()[:20000])
