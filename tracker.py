"""Follow faces across the frames of a video, so that a person keeps one stable label.

    from tracker import FaceTracker
    tracker = FaceTracker()
    for k, frame in enumerate(frames):
        faces = predictor(frame, distribution=True)          # predictor.AgeGenderPredictor
        ids = tracker.update(k, faces)                       # one track id per face
        label = tracker.tracks[ids[0]].summary()             # age, age_std, gender, gender_prob so far

Association (per frame, Hungarian assignment with scipy): the cost of pairing a track with a face is
1 - IoU of the face's box with the track's box predicted at this frame (constant velocity), plus the
mean distance between their five landmarks in units of the face's size. A pair is allowed only if the
boxes overlap or the landmarks are within one face size of each other; faces left over start new tracks,
and a track unseen for `max_lost` frames ends. The velocity is what keeps two faces that cross from
swapping identities: each track's predicted box is ahead of it in its own direction.

Aggregation: a track's label averages the predicted age distributions and gender probabilities of all
its faces so far, each weighted by detection score times face height (a larger, surer face says more),
so the age shown is read off the averaged distribution as the model's ages are (its mean or median,
`age_estimate`) and its ± is the spread of that distribution.
"""
import numpy as np

from detector import box_iou
from metrics import age_std_of, predicted_age


class Track:
    def __init__(self, track_id, frame, face, age_std_scale=1.0, age_estimate="mean", unsure_below=0.0, apparent_age_std_scale=1.0):
        self.id = track_id
        self.first_frame = self.last_frame = frame
        self.boxes = {}
        self.velocity = np.zeros(4)
        self.weight = 0.0
        self.age_prob = None
        self.apparent_age_prob = None  # a two-age model's apparent age, averaged as the age is
        self.gender_prob = None
        self.age_std_scale = age_std_scale
        self.apparent_age_std_scale = apparent_age_std_scale
        self.age_estimate = age_estimate
        self.unsure_below = unsure_below
        self._add(frame, face)

    def predicted_box(self, frame):
        return self.box + self.velocity * (frame - self.last_frame)

    def predicted_landmarks(self, frame):
        shift = self.velocity * (frame - self.last_frame)
        return self.landmarks + (shift[:2] + shift[2:]) / 2  # moves with the box centre

    def _add(self, frame, face):
        box = np.asarray(face["box"], dtype=np.float64)
        if self.boxes and face.get("detected", True):  # a face carried forward says nothing new about motion
            gap = frame - self.last_frame
            self.velocity = 0.5 * self.velocity + 0.5 * (box - self.box) / max(1, gap)  # smoothed: detections jitter
        self.box, self.landmarks, self.last_frame = box, np.asarray(face["landmarks"], dtype=np.float64), frame
        self.score = float(face.get("score", 1.0))
        self.boxes[frame] = [round(float(v), 1) for v in box]
        if face.get("age_distribution") is None:
            return
        w = float(face.get("score", 1.0)) * max(1.0, box[3] - box[1])
        age_prob = np.asarray(face["age_distribution"], dtype=np.float64)
        p_male = face["gender_prob"] if face["gender"] == "M" else 1 - face["gender_prob"]
        self.age_prob = w * age_prob if self.age_prob is None else self.age_prob + w * age_prob
        if face.get("apparent_age_distribution") is not None:
            apparent = w * np.asarray(face["apparent_age_distribution"], dtype=np.float64)
            self.apparent_age_prob = apparent if self.apparent_age_prob is None else self.apparent_age_prob + apparent
        self.gender_prob = w * p_male if self.gender_prob is None else self.gender_prob + w * p_male
        self.weight += w

    def summary(self):
        """The track's label so far: age and its ± from the averaged distribution, gender and its probability."""
        if self.age_prob is None:
            return {}
        p = (self.age_prob / self.weight)[None]
        age = float(predicted_age(p, self.age_estimate)[0])
        std = float(age_std_of(p)[0]) * self.age_std_scale
        p_male = self.gender_prob / self.weight
        label = {"age": round(age, 1), "age_std": round(std, 1), "gender": "M" if p_male >= 0.5 else "F",
                 "gender_prob": round(max(p_male, 1 - p_male), 4), "gender_unsure": bool(max(p_male, 1 - p_male) < self.unsure_below)}
        if self.apparent_age_prob is not None:
            q = (self.apparent_age_prob / self.weight)[None]
            label["apparent_age"] = round(float(predicted_age(q, self.age_estimate)[0]), 1)
            label["apparent_age_std"] = round(float(age_std_of(q)[0]) * self.apparent_age_std_scale, 1)
        return label

    def to_dict(self):
        return {"id": self.id, "first_frame": self.first_frame, "last_frame": self.last_frame,
                "frames_seen": len(self.boxes), "boxes": {str(k): v for k, v in self.boxes.items()}, **self.summary()}


class FaceTracker:
    def __init__(self, max_lost=15, landmark_gate=1.0, age_std_scale=1.0, age_estimate="mean", unsure_below=0.0,
                 apparent_age_std_scale=1.0):
        self.max_lost = max_lost
        self.unsure_below = unsure_below  # the person's averaged gender is unsure below this, as a face's is
        self.age_std_scale = age_std_scale  # the calibration factor of the model's std (calibrate.py)
        self.apparent_age_std_scale = apparent_age_std_scale  # ... and of its apparent age's, for a two-age model
        self.age_estimate = age_estimate  # mean or median of the distribution, as the predictor reads ages
        self.landmark_gate = landmark_gate
        self.tracks = {}  # every track so far, by id
        self.active = []  # ids of tracks that may still be matched
        self._next_id = 0

    def _cost(self, track, face, frame):
        box = np.asarray(face["box"], dtype=np.float64)
        iou = box_iou(track.predicted_box(frame), box)
        size = max(1.0, box[3] - box[1])
        lm_dist = float(np.linalg.norm(track.predicted_landmarks(frame) - np.asarray(face["landmarks"]), axis=1).mean()) / size
        if iou <= 0 and lm_dist > self.landmark_gate:
            return None
        return (1 - iou) + lm_dist

    def carried_forward(self, frame):
        """detector.Face objects for the tracks seen at the last update, moved to where their velocity puts
        them at `frame` (to predict without running the detector); None if there are none to carry."""
        from detector import Face

        if not self.active:
            return None
        last = max(self.tracks[t].last_frame for t in self.active)
        live = [self.tracks[t] for t in self.active if self.tracks[t].last_frame == last]
        return [Face(t.predicted_box(frame), t.score, t.predicted_landmarks(frame)) for t in live] or None

    def update(self, frame, faces):
        """Match this frame's faces (dicts with box, landmarks, score and, to aggregate, age_distribution,
        gender, gender_prob) to tracks; returns the track id of each face, in order."""
        self.active = [t for t in self.active if frame - self.tracks[t].last_frame <= self.max_lost]
        ids = [None] * len(faces)
        if self.active and faces:
            # imported on first use: scipy.optimize adds ~2 s to the start-up of every demo, video or not
            from scipy.optimize import linear_sum_assignment

            big = 1e6
            cost = np.full((len(self.active), len(faces)), big)
            for i, tid in enumerate(self.active):
                for j, face in enumerate(faces):
                    c = self._cost(self.tracks[tid], face, frame)
                    if c is not None:
                        cost[i, j] = c
            for i, j in zip(*linear_sum_assignment(cost)):
                if cost[i, j] < big:
                    tid = self.active[i]
                    self.tracks[tid]._add(frame, faces[j])
                    ids[j] = tid
        for j, face in enumerate(faces):
            if ids[j] is None:
                t = Track(self._next_id, frame, face, self.age_std_scale, self.age_estimate, self.unsure_below, self.apparent_age_std_scale)
                self._next_id += 1
                self.tracks[t.id] = t
                self.active.append(t.id)
                ids[j] = t.id
        return ids
