"""Serve aligned 112x96 faces from the cache written by pre_process.py, fast, with augmentation.

    from data_gen import FaceCache, make_loader
    train_set = FaceCache("data/utkface", split="train", train=True)
    x, age, gender = train_set[0]                    # 3x112x96 float tensor, int, int
    loader = make_loader(train_set, batch_size=128)  # yields batches (x, age, gender)

Batches are read from a memory-mapped uint8 array with one fancy index and augmented as a whole
batch (see `augment`): one small cv2 warp and one cv2 colour transform (colour jitter and
normalisation folded into one 3x4 matrix) per face, which is what makes it fast. Each batch carries
its own seed, so augmentation is reproducible whatever the number of workers, and an interrupted run
resumes on exactly the same batches.
"""
import csv
import json
import math
import os
from collections import Counter
from types import SimpleNamespace

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import conditions
import config
from metrics import age_group
from models import normalize, pixel_transform


class CacheError(Exception):
    pass


_GRAY = np.array([0.299, 0.587, 0.114])


def augment(raw, rng, inside=None, fill_outside=0.0, scale_range=config.AUG_SCALE, hard=0.0, pose=0.0, clean_view=False,
            harsh=0.0, neighbour=0.0, sharp=0.0):
    """Augment a uint8 NHWC batch and normalise it: returns a float NCHW tensor (channels_last memory),
    and with `clean_view` also the same faces before anything a photo does to a face (below).

    Geometry (flip, rotation +-12 deg, scale uniform in `scale_range` (> 1 enlarges the face), shift
    +-6%) is one cv2.warpAffine per face on uint8 pixels. With `inside` (N x H x W bool: the crop pixels that came from inside the source photo)
    a share `fill_outside` of the faces get their outside pixels (replicated border in the cache)
    filled from another face of the batch whose crop is real there: tight crops such as UTKFace's leave
    about a quarter of the aligned crop (the top band) as smeared border, where deployment photos show hair, hats and
    background. Then 20% of faces are made low-resolution and 25% get a grey patch. Colour
    (brightness, contrast, saturation, 10% grayscale) and the ImageNet normalisation are all linear in
    the pixel, so they fold into one 3x4 matrix per face, applied by one cv2.transform. Both are a few
    microseconds per face, which is what makes this fast on a CPU.

    Real conditions (conditions.py): a share `pose` of the faces are turned away by 10-35 degrees and
    aligned again as the demo aligns a turned face (conditions.yaw_matrix, in the same warp), and a share
    `hard` get one of conditions.TRAIN_CONDITIONS (JPEG, blur, under- or over-exposure, noise), a share
    `harsh` of those drawn from the hard-conditions validation's harsher ranges (conditions.degrade), and a
    share `neighbour` get another face of the batch beside them, cheek to cheek (conditions.beside), before
    the resolution and the damage, which a photo applies to both alike. A share `sharp` of the faces kept at
    full resolution are sharpened (conditions.sharpen), as large photos are once shrunk to the crop.

    The clean view has the same flip, rotation, scale and shift, and nothing else: not turned, full
    resolution, undamaged, no patch, its own colours. It is what train.py's teachers see with
    `--teacher-view clean`, so that the network learns to read a damaged or turned face as they read
    the clean one. It draws nothing from `rng`: the augmented batch is the same with or without it.
    """
    n, h, w, _ = raw.shape
    d = _draw(rng, n, h, w, scale_range, inside is not None, fill_outside, pose, hard, harsh, neighbour, sharp)
    if d.fill.any():  # in the template's frame, before the warp, where the sources' crops line up
        raw = raw.copy()
        _fill_outside(raw, inside, d.fill, d.donor_pick)
    warped, clean = _warp(raw, d, clean_view)
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        _as_in_a_photo(warped[i], raw, i, d, rng)
        # saturation: x -> s*x + (1-s)*gray(x); contrast about the mean gray level; then brightness
        s, c, b = d.saturation[i], d.contrast[i], d.brightness[i]
        mat = b * c * (s * np.eye(3) + (1 - s) * _GRAY[None, :])
        offset = b * (1 - c) * float(np.dot(cv2.mean(raw[i])[:3], _GRAY))
        cv2.transform(warped[i].astype(np.float32), pixel_transform(mat, np.full(3, offset)), dst=out[i])
    out = torch.from_numpy(out).permute(0, 3, 1, 2)
    return (out, normalize(clean)) if clean_view else out


def _draw(rng, n, h, w, scale_range, has_inside, fill_outside, pose, hard, harsh, neighbour, sharp=0.0):
    """Every random choice of augment() for a batch of n faces, drawn in one fixed order."""
    d = SimpleNamespace()
    d.flip = rng.random(n) < 0.5
    d.angle = rng.uniform(-12, 12, n)
    d.scale = rng.uniform(scale_range[0], scale_range[1], n)
    d.shift = rng.uniform(-0.06, 0.06, (n, 2)) * (w, h)
    d.brightness = rng.uniform(0.7, 1.3, n)
    d.contrast = rng.uniform(0.7, 1.3, n)
    d.saturation = np.where(rng.random(n) < 0.1, 0.0, rng.uniform(0.6, 1.4, n))
    # A fifth of the faces lose resolution (shrunk to 25-60% and blown up again): faces in real photos
    # are often 30-60 pixels tall, far softer than UTKFace's 200x200 crops.
    d.lowres = np.where(rng.random(n) < 0.2, rng.uniform(0.25, 0.6, n), 1.0)
    # A quarter get a flat grey patch over 2-15% of the crop (random erasing): real faces are partly
    # hidden by hands, microphones, hair or another head far more often than UTKFace's are.
    d.erase = rng.random(n) < 0.25
    area, aspect = rng.uniform(0.02, 0.15, n) * h * w, np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    d.eh, d.ew = np.minimum(h, np.sqrt(area * aspect)).astype(int), np.minimum(w, np.sqrt(area / aspect)).astype(int)
    d.ey, d.ex = (rng.random(n) * (h - d.eh + 1)).astype(int), (rng.random(n) * (w - d.ew + 1)).astype(int)
    d.grey = rng.integers(0, 256, n)
    d.fill = rng.random(n) < fill_outside if has_inside else np.zeros(n, bool)
    d.donor_pick = rng.random(n)
    d.turned = rng.random(n) < pose
    d.yaw = rng.choice([-1.0, 1.0], n) * rng.uniform(10, 35, n)
    d.damaged = rng.random(n) < hard
    d.damage = rng.integers(0, len(conditions.TRAIN_CONDITIONS), n)
    # drawn only when asked for, so that runs without them draw the same batches
    d.harsh = rng.random(n) < harsh if harsh > 0 else np.zeros(n, bool)
    d.crowded = rng.random(n) < neighbour if neighbour > 0 else np.zeros(n, bool)
    d.partner = (np.arange(n) + rng.integers(1, max(n, 2), n)) % n if neighbour > 0 else None  # never the face itself
    # sharper than any cached crop: the faces of large photos, which otherwise read older (docs/EXPERIMENTS.md, row 84)
    d.sharp = (rng.random(n) < sharp) & (d.lowres == 1) if sharp > 0 else np.zeros(n, bool)
    d.sharp_amount = rng.uniform(0.5, 1.5, n) if sharp > 0 else None
    d.sharp_sigma = rng.uniform(0.8, 1.6, n) if sharp > 0 else None
    return d


def _warp(raw, d, clean_view):
    """Flip, rotation, scale, shift (and the turn of a turned face) in one warp per face; with clean_view,
    the same faces not turned."""
    n, h, w, _ = raw.shape
    warped = np.empty((n, h, w, 3), np.uint8)
    clean = np.empty((n, h, w, 3), np.uint8) if clean_view else None
    for i in range(n):
        m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), d.angle[i], d.scale[i])
        m[:, 2] += d.shift[i]
        if d.flip[i]:  # mirror the source first: x -> w - 1 - x
            m[:, 0], m[:, 2] = -m[:, 0], m[:, 2] + m[:, 0] * (w - 1)
        if d.turned[i]:
            if clean_view:
                cv2.warpAffine(raw[i], m, (w, h), dst=clean[i], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            m = np.vstack([m, [0, 0, 1]]) @ conditions.yaw_matrix(d.yaw[i])[0]
            cv2.warpPerspective(raw[i], m, (w, h), dst=warped[i], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        else:
            cv2.warpAffine(raw[i], m, (w, h), dst=warped[i], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            if clean_view:
                clean[i] = warped[i]
    return warped, clean


def _as_in_a_photo(face, raw, i, d, rng):
    """In place, what a photo does to face i: a neighbour beside it, then low resolution, a real
    condition and a grey patch, in the order a camera and a scene apply them."""
    h, w = face.shape[:2]
    if d.crowded[i] and len(raw) > 1:
        face[:] = conditions.beside(face, raw[d.partner[i]], rng)
    if d.lowres[i] < 1:
        small = cv2.resize(face, None, fx=d.lowres[i], fy=d.lowres[i], interpolation=cv2.INTER_AREA)
        cv2.resize(small, (w, h), dst=face, interpolation=cv2.INTER_LINEAR)
    if d.sharp[i]:
        face[:] = conditions.sharpen(face, d.sharp_amount[i], d.sharp_sigma[i])
    if d.damaged[i]:
        face[:] = conditions.degrade(face, conditions.TRAIN_CONDITIONS[d.damage[i]], rng, harsh=d.harsh[i])
    if d.erase[i]:
        face[d.ey[i]:d.ey[i] + d.eh[i], d.ex[i]:d.ex[i] + d.ew[i]] = d.grey[i]


def _fill_outside(raw, inside, fill, donor_pick):
    """In place: where face i (with fill[i]) shows replicated border, paste the same pixels of a donor
    face of the batch that is real at all of them (donor_pick in [0, 1) chooses among the candidates)."""
    n = len(raw)
    flat = inside.reshape(n, -1)
    for i in np.flatnonzero(fill):
        outside = ~flat[i]
        if not outside.any():
            continue
        donors = np.flatnonzero(flat[:, outside].all(1))
        donors = donors[donors != i]
        if len(donors):
            j = donors[int(donor_pick[i] * len(donors))]
            raw[i][~inside[i]] = raw[j][~inside[i]]


class SeededBatch(list):
    """A list of indices that also carries the seed for augmenting that batch."""

    def __init__(self, items, seed):
        super().__init__(items)
        self.seed = seed


class FaceCache(Dataset):
    """The cache of pre_process.py, optionally restricted to one split.

    Items are (3x112x96 float tensor, age, gender); gender is -1 where the source has no gender label.
    """

    def __init__(self, cache_dir, split=None, train=False, seed=0, fill_outside=0.0, aug_scale=config.AUG_SCALE):
        info_path = os.path.join(cache_dir, "cache.json")
        if not os.path.isfile(info_path):
            raise CacheError(f"{cache_dir}: no cache here (cache.json missing); run pre_process.py first")
        with open(info_path) as f:
            self.info = json.load(f)
        if (self.info.get("image_h"), self.info.get("image_w")) != (config.IMAGE_H, config.IMAGE_W):
            raise CacheError(f"{cache_dir}: cache holds {self.info.get('image_h')}x{self.info.get('image_w')} faces, "
                             f"this code expects {config.IMAGE_H}x{config.IMAGE_W}; rebuild it with pre_process.py")
        try:
            self.faces = np.load(os.path.join(cache_dir, "faces.npy"), mmap_mode="r")
            with open(os.path.join(cache_dir, "meta.csv"), newline="") as f:
                self.meta = list(csv.DictReader(f))
            inside_path = os.path.join(cache_dir, "inside.npy")  # caches made before it existed have none
            self.inside = np.load(inside_path, mmap_mode="r") if os.path.isfile(inside_path) else None
            marks_path = os.path.join(cache_dir, "landmarks.npy")
            landmarks = np.load(marks_path, mmap_mode="r") if os.path.isfile(marks_path) else None
        except (OSError, ValueError) as e:
            raise CacheError(f"{cache_dir}: unreadable cache ({e})")
        if self.faces.shape[1:] != (config.IMAGE_H, config.IMAGE_W, 3) or len(self.meta) != len(self.faces):
            raise CacheError(f"{cache_dir}: faces.npy {self.faces.shape} does not match meta.csv ({len(self.meta)} rows)")
        if self.inside is not None and len(self.inside) != len(self.faces):
            raise CacheError(f"{cache_dir}: inside.npy has {len(self.inside)} rows, faces.npy {len(self.faces)}")
        rows = [i for i, r in enumerate(self.meta) if split is None or r["split"] == split]
        if not rows:
            raise CacheError(f"{cache_dir}: no faces in split '{split}'")
        self.name = os.path.basename(os.path.normpath(cache_dir))
        self.indices = np.array(rows, dtype=np.int64)
        # how far each face is turned away (conditions.turn_of; 0 where the cache has no landmarks)
        self.has_landmarks = landmarks is not None and len(landmarks) == len(self.faces)
        self.turn = conditions.turn_of(landmarks[self.indices]) if self.has_landmarks else np.zeros(len(rows))
        try:
            self.ages = torch.tensor([int(self.meta[i]["age"]) for i in rows])
            self.genders = torch.tensor([int(self.meta[i]["gender"]) for i in rows])
        except (KeyError, ValueError) as e:
            raise CacheError(f"{cache_dir}: meta.csv has a bad age or gender ({e})")
        self.races = [self.meta[i].get("race") or "" for i in rows]  # '' where the source has none
        # the age label of each face as the range [min, max] of ages it allows: one age, or an annotated
        # group (FairFace) whose meta.csv `age` is only its middle
        try:
            self.spans = torch.tensor([[int(self.meta[i].get("age_min") or self.meta[i]["age"]),
                                        int(self.meta[i].get("age_max") or self.meta[i]["age"])] for i in rows])
        except ValueError as e:
            raise CacheError(f"{cache_dir}: meta.csv has a bad age range ({e})")
        # which age the labels give: real (years since birth) or apparent (as people judge the face); caches
        # written before cache.json said so are real, except CLAP2016's
        self.age_kind = self.info.get("age_kind") or ("apparent" if self.info.get("dataset") == "clap2016" else "real")
        self.train, self.seed, self.fill_outside, self.calls = train, seed, fill_outside, 0
        self.aug_scale = tuple(aug_scale)
        self.hard_aug = self.pose_aug = self.hard_harsh = self.neighbour_aug = self.sharpen_aug = 0.0
        self.clean_view = False

    def __len__(self):
        return len(self.indices)

    def rows(self):
        return [self.meta[i] for i in self.indices]

    def __getitem__(self, i):
        self.calls += 1
        x, age, gender = self.__getitems__(SeededBatch([i], seed=self.seed * 1_000_003 + self.calls))
        return x[0], int(age[0]), int(gender[0])

    def read(self, pos, with_inside=False):
        """Raw uint8 faces, ages, genders and (with_inside) inside masks (N x H x W bool, or None) of positions `pos`."""
        idx = self.indices[pos]
        order = np.argsort(idx)  # read the memory map in file order, then put the batch back in order
        raw = np.empty((len(idx),) + self.faces.shape[1:], dtype=np.uint8)
        raw[order] = self.faces[idx[order]]
        inside = None
        if with_inside and self.inside is not None:
            packed = np.empty((len(idx),) + self.inside.shape[1:], dtype=np.uint8)
            packed[order] = self.inside[idx[order]]
            inside = np.unpackbits(packed, axis=2, count=config.IMAGE_W).astype(bool)
        return raw, self.ages[pos], self.genders[pos], inside

    def __getitems__(self, batch):
        raw, ages, genders, inside = self.read(np.asarray(batch, dtype=np.int64), with_inside=self.train and self.fill_outside > 0)
        return _serve(self, batch, raw, inside), ages, genders


def _serve(ds, batch, raw, inside):
    if ds.train:
        return augment(raw, np.random.default_rng(int(getattr(batch, "seed", 0))), inside, ds.fill_outside, ds.aug_scale,
                       ds.hard_aug, ds.pose_aug, ds.clean_view, ds.hard_harsh, ds.neighbour_aug, ds.sharpen_aug)
    return normalize(raw)


class MixedFaces(Dataset):
    """Several caches as one dataset (indices run through them in order); a batch mixing sources is
    augmented as one, so faces of one source can lend real background to another's (augment).

    hard_aug, pose_aug, hard_harsh, neighbour_aug, sharpen_aug: the shares of augment's real conditions. turned_weight: faces turned away
    (conditions.TURNED) are drawn this many times as often as the others of their source (`repeats`,
    used by make_loader), since they are rare in the training data and common in photos. balance (one power,
    or one per source): the same for rare age groups, genders and races (balance_repeats); the two multiply.
    A batch is (x, age, gender, source, span): source is each face's index in `sources` (train.py's
    --teacher-sources distils on some sources only, and trains each source's kind of age), span the
    [min, max] of ages its label allows (FaceCache.spans). With clean_view, (x, age, gender, source, span, clean):
    clean is augment's clean view of the same faces, for the teachers."""

    def __init__(self, sources, fill_outside=0.0, aug_scale=config.AUG_SCALE, hard_aug=0.0, pose_aug=0.0, turned_weight=1,
                 balance=0.0, clean_view=False, hard_harsh=0.0, neighbour_aug=0.0, sharpen_aug=0.0):
        self.sources = list(sources)
        self.clean_view = clean_view and any(s.train for s in self.sources)
        self.aug_scale = tuple(aug_scale)
        self.hard_aug, self.pose_aug, self.hard_harsh, self.neighbour_aug = hard_aug, pose_aug, hard_harsh, neighbour_aug
        self.sharpen_aug = sharpen_aug
        turn = np.concatenate([s.turn for s in self.sources])
        repeats = np.where(turn >= conditions.TURNED, int(turned_weight), 1)
        powers = np.broadcast_to(np.asarray(balance, dtype=np.float64), len(self.sources))  # one, or one per source
        if (powers > 0).any():
            repeats = repeats * np.concatenate([balance_repeats(s.ages.numpy(), s.genders.numpy(), s.races, power)
                                                for s, power in zip(self.sources, powers)])
        self.repeats = repeats if (repeats != 1).any() else None
        self.sizes = [len(s) for s in self.sources]
        self.starts = np.cumsum([0] + self.sizes)
        self.train = any(s.train for s in self.sources)
        self.fill_outside = fill_outside
        if any(s.inside is None for s in self.sources):
            self.fill_outside = 0.0

    def __len__(self):
        return int(self.starts[-1])

    def __getitems__(self, batch):
        pos = np.asarray(batch, dtype=np.int64)
        which = np.searchsorted(self.starts, pos, side="right") - 1
        raw = np.empty((len(pos), config.IMAGE_H, config.IMAGE_W, 3), np.uint8)
        inside = np.ones((len(pos), config.IMAGE_H, config.IMAGE_W), bool)
        ages, genders = torch.empty(len(pos), dtype=torch.int64), torch.empty(len(pos), dtype=torch.int64)
        spans = torch.empty((len(pos), 2), dtype=torch.int64)
        for s in np.unique(which):
            m = which == s
            r, a, g, ins = self.sources[s].read(pos[m] - self.starts[s], with_inside=self.fill_outside > 0)
            raw[m], ages[torch.from_numpy(m)], genders[torch.from_numpy(m)] = r, a, g
            spans[torch.from_numpy(m)] = self.sources[s].spans[pos[m] - self.starts[s]]
            if ins is not None:
                inside[m] = ins
        x = _serve(self, batch, raw, inside if self.fill_outside else None)
        if self.clean_view:  # augment gave (x, clean); the teachers' view goes last
            return x[0], ages, genders, torch.from_numpy(which), spans, x[1]
        return x, ages, genders, torch.from_numpy(which), spans


def balance_repeats(ages, genders, races, power, max_repeats=config.BALANCE_MAX_REPEATS):
    """How many times as often each face of one source is drawn so that its age groups x genders x races
    (config.AGE_GROUPS; a gender of -1 or a race of '' is one group of its own) come closer to equal:
    round((largest group / own group) ** power), between 1 and max_repeats. The cap keeps a group of a
    few faces from being seen so often that it is learned by heart."""
    keys = [(age_group(int(a)), int(g), r) for a, g, r in zip(ages, genders, races)]
    counts = Counter(keys)
    largest = max(counts.values())
    return np.array([min(max_repeats, max(1, round((largest / counts[k]) ** power))) for k in keys], dtype=np.int64)


class EpochBatchSampler:
    """Batches for one epoch: a seeded permutation, split between DDP ranks, resumable mid-epoch.

    An epoch passes over every item `passes` times (a small training set is passed over several times an
    epoch so that a run trains enough steps to move; train.py --min-steps). The last batch is whole
    (training: `fill_last`, topped up with the first items of the epoch's order, so that every item is
    seen and every batch is full), dropped (`drop_last`) or short (validation).
    With `sizes` and `weights` (several sources laid end to end, as in MixedFaces) an epoch still has
    n items, but source k supplies a share weights[k] / sum(weights) of them, drawn without repeats
    until that source is used up (a small source given a large weight is cycled through several times).
    """

    def __init__(self, n, batch_size, shuffle=True, seed=0, rank=0, world_size=1, drop_last=False, sizes=None, weights=None,
                 repeats=None, fill_last=False, passes=1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        # repeats (n ints >= 1): item i is drawn repeats[i] times as often as an item with 1 in its source
        self.repeats = None if repeats is None else torch.as_tensor(np.asarray(repeats), dtype=torch.int64)
        self.rank, self.world_size, self.drop_last, self.fill_last = rank, world_size, drop_last, fill_last
        self.passes = passes
        self.epoch, self.start_batch = 0, 0
        self.sizes, self.weights = sizes, weights
        if weights is not None:
            if len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0 or sum(sizes) != n:
                raise ValueError(f"source weights {list(weights)} do not fit source sizes {list(sizes)}")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        items = self.n * self.passes
        if self.drop_last:
            return items // self.world_size // self.batch_size
        return math.ceil(math.ceil(items / self.world_size) / self.batch_size)

    def _weighted_order(self, draw):
        gen = torch.Generator().manual_seed(self.seed * 7919 + draw)
        sizes = self.sizes if self.weights is not None else [self.n]
        weights = self.weights if self.weights is not None else [1.0]
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        counts = np.floor(w * self.n).astype(int)
        counts[np.argmax(w)] += self.n - counts.sum()  # rounding leftovers go to the largest share
        start, parts = 0, []
        for size, count in zip(sizes, counts):
            if count and size:
                pool = torch.arange(start, start + size)
                if self.repeats is not None:
                    pool = torch.repeat_interleave(pool, self.repeats[start:start + size])
                cycles = -(-count // len(pool))
                parts.append(pool[torch.cat([torch.randperm(len(pool), generator=gen) for _ in range(cycles)])[:count]])
            start += size
        order = torch.cat(parts)
        return order[torch.randperm(len(order), generator=gen)].numpy()

    def __iter__(self):
        order = np.concatenate([self._order(self.passes * self.epoch + k) for k in range(self.passes)])
        if self.world_size > 1 or self.fill_last:
            # whole batches on every rank: the order wraps round to its start (fill_last), or is cut (drop_last)
            per_rank = len(self) * self.batch_size if self.drop_last or self.fill_last else math.ceil(len(order) / self.world_size)
            order = np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]
        for b in range(self.start_batch, len(self)):
            items = order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            seed = ((self.seed * 1_000_003 + self.epoch) * 100_003 + b) * 257 + self.rank
            yield SeededBatch(items, seed=seed)

    def _order(self, draw):
        """One pass over the items: the permutation of draw number `draw` (the epoch's, with one pass)."""
        if self.shuffle and (self.weights is not None or self.repeats is not None):
            return self._weighted_order(draw)
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + draw)).numpy()
        return np.arange(self.n)


def _whole_batch(batch):
    return batch  # __getitems__ already returns a collated batch


def make_loader(dataset, batch_size, shuffle=None, seed=0, rank=0, world_size=1, workers=None, drop_last=False, pin_memory=None,
                source_weights=None, passes=1):
    """A DataLoader over batches (see EpochBatchSampler); returns (loader, sampler). A training set's batches
    are all whole, the last topped up from the start of the epoch; a validation set's last batch is short.

    source_weights: for a MixedFaces, the share of each source in an epoch (default: by size);
    passes: how many times an epoch passes over the training set."""
    shuffle = dataset.train if shuffle is None else shuffle
    sizes = getattr(dataset, "sizes", None)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, rank, world_size, drop_last,
                                sizes=sizes if source_weights else None, weights=source_weights or None,
                                repeats=getattr(dataset, "repeats", None) if shuffle else None,
                                fill_last=dataset.train and not drop_last, passes=passes)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_whole_batch, num_workers=workers,
                        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                        generator=torch.Generator())  # keeps the global RNG (dropout) untouched by iter()
    return loader, sampler
