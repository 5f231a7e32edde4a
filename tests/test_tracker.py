"""tracker.py: video tracks keep identities and steady labels."""
import json
import os
from collections import defaultdict

import cv2
import numpy as np
import pytest

import demo
from conftest import UTK, utk_rows
from tracker import FaceTracker
from utils import read_image


def _crossing_clip(path, n=48):
    """Two real faces (25 and 55 years old) moving in opposite directions, growing and shrinking, the
    older one passing in front of the younger one halfway; returns the true face centres per frame."""
    rows = utk_rows("test", 200, seed=3)
    young = next(r for r in rows if 25 <= int(r["age"]) <= 35)
    old = next(r for r in rows if 55 <= int(r["age"]) <= 70)
    fa, fb = read_image(os.path.join(UTK, young["file"])), read_image(os.path.join(UTK, old["file"]))
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 12, (640, 480))
    truth = []
    for t in range(n):
        u = t / (n - 1)
        frame = np.empty((480, 640, 3), np.uint8)
        frame[:] = np.linspace(100, 200, 640)[None, :, None].astype(np.uint8)
        sa, sb = int(110 + 40 * u), int(150 - 40 * u)
        xa, xb = int(20 + 460 * u), int(480 - 460 * u)
        for face, x, y, s in ((fa, xa, 90, sa), (fb, xb, 170, sb)):
            img = cv2.resize(face, (s, s), interpolation=cv2.INTER_AREA).astype(np.float32)
            frame[y:y + s, x:x + s] = np.clip(img * rng.uniform(0.8, 1.2) + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        truth.append(((xa + sa / 2, 90 + sa / 2), (xb + sb / 2, 170 + sb / 2)))
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return np.array(truth)


@pytest.mark.parametrize("detect_every", [1, 2, 3])  # 2: demo.py's default
def test_video_tracks_keep_identities_and_steady_labels(tmp_path, capsys, detect_every):
    truth = _crossing_clip(tmp_path / "clip.mp4")
    assert demo.main([str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "o"), "--json", str(tmp_path / "v.json"),
                      "--detect-every", str(detect_every)]) == 0
    video = json.loads((tmp_path / "v.json").read_text())[0]
    who_by_track, raw_age, shown_age = defaultdict(set), defaultdict(list), defaultdict(list)
    for fr in video["frames"]:
        for f in fr["faces"]:
            centre = np.array([(f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2])
            who = int(np.argmin(np.linalg.norm(truth[fr["frame"]] - centre, axis=1)))
            who_by_track[f["track"]].add(who)
            raw_age[who].append(f["age"])
            shown_age[f["track"]].append(f["track_label"]["age"])
    long_tracks = [t for t in video["tracks"] if t["frames_seen"] >= 10]
    assert len(long_tracks) == 2  # one per person
    assert all(len(people) == 1 for people in who_by_track.values())  # no track ever holds both people: no swap
    for t in long_tracks:
        person = next(iter(who_by_track[t["id"]]))
        assert np.std(shown_age[t["id"]]) * 3 <= np.std(raw_age[person])  # the label shown flickers 3x less
        assert set(t) >= {"id", "first_frame", "last_frame", "frames_seen", "boxes", "age", "age_std", "gender", "gender_prob", "gender_unsure"}
    young, old = sorted(long_tracks, key=lambda t: t["age"])
    assert young["age"] < old["age"] - 15
    detected = [f["detected"] for fr in video["frames"] for f in fr["faces"]]
    assert sum(detected) == (len(detected) if detect_every == 1 else pytest.approx(len(detected) / detect_every, abs=3))


def test_tracker_ends_lost_tracks_and_starts_new_ones():
    face = {"box": [100, 100, 200, 200], "landmarks": [[130, 140], [170, 140], [150, 160], [135, 180], [165, 180]], "score": 1.0}
    far = {**face, "box": [400, 100, 500, 200], "landmarks": [[x + 300, y] for x, y in face["landmarks"]]}
    t = FaceTracker(max_lost=3)
    assert t.update(0, [face]) == [0]
    assert t.update(1, [face, far]) == [0, 1]
    assert t.update(9, [face]) == [2]  # unseen for 8 frames: a new person as far as we know
