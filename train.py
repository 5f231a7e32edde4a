"""Train AgeGenderNet on a cache made by pre_process.py.

    python train.py --cache data/utkface --arch resnet18                       # one GPU, or the CPU
    python train.py --cache data/utkface --arch mobilenet_v2 --epochs 30 --out-dir checkpoints/mnv2
    python train.py --out-dir checkpoints/mnv2 --arch mobilenet_v2 --epochs 30 --resume   # go on after a stop
    torchrun --nproc_per_node=8 train.py --cache data/imdb                     # 8 GPUs, DDP (nccl)
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...  # two machines
    torchrun --nproc_per_node=2 train.py --device cpu                          # DDP on the CPU (gloo)

Loss = CE(gender) + age_weight * age loss (`--age-loss ce` or `dldl`: KL divergence to a Gaussian
label distribution around the true age plus an L1 term on the expected age). With `--teacher A.pt B.pt`
(knowledge distillation) a share `--distill-weight` of the loss instead follows the teachers' averaged
gender and age distributions on the same batch: one network learns what several predict together,
for the run-time cost of one; `--teacher-sources data/utkface ...` keeps
that term to some sources' faces, so a source the teachers never saw learns from its labels, and
`--distill-weight 0.8 1.0 0.3` sets it per --cache. Every default lives in
config.py (TrainConfig). Writes to --out-dir: last.pt (every --ckpt-every steps and every epoch),
best.pt (lowest validation MAE), log.csv and curves.png. Checkpoints are written atomically and
loaded with weights_only=True; --resume restores model, optimizer, schedule, scaler, RNG and the
position inside the epoch, so an interrupted run continues exactly where it stopped.
"""
import copy
import csv
import dataclasses
import glob
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import config
from data_gen import CacheError, FaceCache, MixedFaces, make_loader
from metrics import compute_metrics, label_stds
from models import ARCHS, AgeGenderNet, CheckpointError, age_mean_std, fuse_batchnorm, load_checkpoint, views_of
from predictor import default_device, predict_batches
from utils import atomic_torch_save, fail, parse_config

# Options that may differ between a run and its --resume: they do not change what is learned.
RESUME_MAY_CHANGE = {"resume", "workers", "max_steps", "ckpt_every", "device", "compile", "cache", "out_dir"}
CHOICES = {"arch": ARCHS, "age_loss": ("ce", "dldl"), "teacher_view": ("same", "clean")}


def gender_loss(gender_logits, gender, weight=None):
    """Cross-entropy over the faces whose gender is known; faces with gender -1 (a source without gender
    labels) add nothing, and a batch with none known gives 0, not NaN. weight (per face, optional) scales
    each face's term; the sum is still divided by the count of known faces, so a weight of w everywhere
    gives w times the unweighted loss."""
    known = (gender >= 0).sum()
    ce = F.cross_entropy(gender_logits, gender, ignore_index=-1, reduction="none")
    return (ce if weight is None else ce * weight).sum() / known.clamp_min(1)


def age_loss(age_logits, span, cfg, weight=None, reduce=True):
    """The age loss averaged over the batch (each face's with reduce=False), each face's term scaled by
    weight (per face) when given. span (N x 2): the [min, max] of ages each face's label allows; an exact
    age (min = max) gets the --age-loss, an age range (FairFace's groups) the range loss."""
    exact = span[:, 0] == span[:, 1]
    per_face = _age_loss_per_face(age_logits, span[:, 0], cfg)
    if not exact.all():
        per_face = torch.where(exact, per_face, range_loss(age_logits, span))
    per_face = per_face if weight is None else per_face * weight
    return per_face.mean() if reduce else per_face


def range_loss(age_logits, span):
    """-log P(lo <= age <= hi) per face: puts the predicted distribution's mass inside the labelled range,
    however it spreads there; an age group is an interval, not its middle age."""
    ages = torch.arange(age_logits.shape[1], device=age_logits.device)
    inside = (ages[None, :] >= span[:, :1]) & (ages[None, :] <= span[:, 1:])
    log_p = F.log_softmax(age_logits.float(), 1)
    return -torch.logsumexp(log_p.masked_fill(~inside, float("-inf")), 1)


def _age_loss_per_face(age_logits, age, cfg):
    if cfg.age_loss == "ce":
        return F.cross_entropy(age_logits, age, reduction="none")
    # dldl: soft targets, a Gaussian of std label_sigma around the true age (DLDL-v2)
    ages = torch.arange(age_logits.shape[1], device=age_logits.device, dtype=torch.float32)
    target = torch.exp(-0.5 * ((ages[None, :] - age[:, None].float()) / cfg.label_sigma) ** 2)
    target = target / target.sum(1, keepdim=True)
    log_p = F.log_softmax(age_logits.float(), 1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_p)).sum(1)
    expected = log_p.exp() @ ages
    return kl + config.L1_WEIGHT * (expected - age.float()).abs()


def check_shares(option, shares, count, of_what):
    """One share per item (or none: the default), non-negative with a positive sum; else one line, exit 2."""
    if shares and len(shares) != count:
        fail(f"{option} has {len(shares)} value(s) for {count} {of_what}")
    if shares and (min(shares) < 0 or sum(shares) <= 0):
        fail(f"{option} must be non-negative with a positive sum, got {list(shares)}")


def distill_loss(logits, soft, cfg, weight=None):
    """KL divergence from the teachers' distributions (soft: gender, age[, apparent age]) to the network's
    (logits, the same outputs): gender on every face, its gender labelled or not (the teachers say
    something about all of them), each age weighted as in the labels' loss; averaged over the batch, each
    face's term scaled by weight (per face) when given. A one-age teacher teaches both ages its one."""
    teacher = list(soft) + [soft[1]] * (len(logits) - len(soft))
    kl = [F.kl_div(F.log_softmax(out, 1), target, reduction="none").sum(1) for out, target in zip(logits, teacher)]
    per_face = kl[0] + cfg.age_weight * sum(kl[1:])
    return (per_face if weight is None else per_face * weight).mean()


def joint_loss(logits, span, gender, cfg, apparent=None, soft=None, share=None):
    """The weighted joint loss of a batch: the labels' loss alone, or with the teachers' distributions
    (soft) each face's share (per face: --distill-weight on the sources the teachers cover, else 0) of
    its loss replaced by the distillation term. logits: the network's (gender, age[, apparent age]);
    with two ages, `apparent` (per face, bool) says which age a face's label gives, and only that
    output learns from it."""
    logits = [t.float() for t in logits]
    gender_logits, age_logits = logits[0], logits[1]
    keep = 1 - share if soft is not None else None
    if len(logits) > 2:  # each face's label trains the output of its kind
        age_logits = torch.where(apparent[:, None], logits[2], age_logits)
    labels = gender_loss(gender_logits, gender, keep) + cfg.age_weight * age_loss(age_logits, span, cfg, keep)
    return labels if soft is None else labels + distill_loss(logits, soft, cfg, share)


def distill_flags(cfg):
    """One flag per --cache: 1 where --teacher-sources (default: all of them) covers its faces."""
    caches = [os.path.normpath(c) for c in cfg.cache]
    for c in cfg.teacher_sources:
        if os.path.normpath(c) not in caches:
            fail(f"--teacher-sources {c} is not one of --cache {' '.join(cfg.cache)}")
    if cfg.teacher_sources and not cfg.teacher:
        fail("--teacher-sources needs --teacher")
    covered = {os.path.normpath(c) for c in cfg.teacher_sources}
    return torch.tensor([float(not covered or c in covered) for c in caches])


def distill_shares(cfg):
    """Each --cache's share of the loss taken by the distillation term: its --distill-weight (one for all,
    or one per cache) where --teacher-sources covers it, else 0."""
    weights = cfg.distill_weight
    if len(weights) not in (1, len(cfg.cache)):
        fail(f"--distill-weight has {len(weights)} values for {len(cfg.cache)} --cache entries (give 1 or {len(cfg.cache)})")
    if not all(0 <= w <= 1 for w in weights):
        fail(f"--distill-weight must be between 0 and 1, got {' '.join(map(str, weights))}")
    return torch.tensor(weights, dtype=torch.float32).expand(len(cfg.cache)) * distill_flags(cfg)


class Teachers(torch.nn.Module):
    """The --teacher checkpoints, frozen, in eval mode: their weighted average of the gender and age
    distributions of a batch (the batch the network is trained on), each teacher with the test-time
    views it predicts with in the demo (models.views_of: one for SFace runs, four for the MobileNetV2
    ones, whose average is better than one view; the network still sees one).
    predict() makes them one model to validate like the network (train.py prints their figures)."""

    def __init__(self, paths, weights, device, own_views=True):
        super().__init__()
        check_shares("--teacher-weights", weights, len(paths), "teacher(s)")
        weights = list(weights) or [1.0] * len(paths)
        self.weights = [w / sum(weights) for w in weights]
        self.nets, self.tta = [], []
        for path in paths:
            try:
                net, ckpt = load_checkpoint(path, device)
            except CheckpointError as e:
                fail(f"--teacher {e}")
            tta, tta_zoom = views_of(ckpt)
            self.nets.append(fuse_batchnorm(net).set_tta_zoom(tta_zoom).requires_grad_(False))
            self.tta.append(tta and own_views)
        self.nets = torch.nn.ModuleList(self.nets)

    def train(self, mode=True):
        return self  # always in eval mode

    @torch.no_grad()
    def forward(self, x, amp_dtype=None):
        """The weighted average of the teachers' (gender, age[, apparent age]) distributions: the apparent age
        where every teacher has two ages (a one-age teacher's age stands for both otherwise)."""
        two = all(net.two_ages for net in self.nets)
        total = None
        for w, net, tta in zip(self.weights, self.nets, self.tta):
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs = net.probabilities(x, tta)[: 3 if two else 2]
            total = [w * p for p in probs] if total is None else [t + w * p for t, p in zip(total, probs)]
        return tuple(total)

    @torch.no_grad()
    def predict(self, x, tta=False):
        gender, age, *apparent = self(x.float())  # each teacher with its own views: what the network learns from
        mean, std = age_mean_std(age, self.nets[0].ages)
        out = {"gender_prob": gender, "age_prob": age, "age": mean, "age_std": std}
        if apparent:
            out["apparent_age_prob"] = apparent[0]
        return out


class WeightAverage:
    """Exponential moving average of a model's weights and BatchNorm statistics (what gets validated)."""

    def __init__(self, net, decay):
        self.decay = decay
        self.model = copy.deepcopy(net).eval().requires_grad_(False)
        self._pairs = list(zip(self.model.state_dict().values(), net.state_dict().values()))

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))  # early on, follow the model closely
        for avg, cur in self._pairs:
            if avg.is_floating_point():
                avg.lerp_(cur, 1 - d)
            else:
                avg.copy_(cur)


def lr_at(step, total_steps, warmup_steps, cfg):
    """Linear warm-up, then cosine decay to lr * MIN_LR_RATIO (a multiplier for LambdaLR)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return config.MIN_LR_RATIO + (1 - config.MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(net, val_set, loader, device, amp_dtype, tta):
    """Metrics of a network on a cache's faces, which `loader` (make_loader's) gives in order: gender
    accuracy, MAE, CS@5, exact-age top-1/top-5, the epsilon error where the labels carry their std, and
    the age group's accuracy where they are age ranges. The age scored is the output of the labels'
    age_kind: the apparent age of a two-age network on apparent labels, else its age."""
    def predict(x):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = net.predict(x, tta=tta)
        if val_set.age_kind == "apparent" and "apparent_age_prob" in out:  # a two-age network (or teachers)
            out["age_prob"] = out["apparent_age_prob"]
        return out

    was_training = net.training
    net.eval()
    gender_prob, age_prob = predict_batches(predict, loader)
    net.train(was_training)
    return compute_metrics(gender_prob, age_prob, val_set.ages.numpy(), val_set.genders.numpy(), label_stds(val_set.rows()),
                           age_span=val_set.spans.numpy())


def plot_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-")
    axes[0].set_title("training loss")
    sources = sorted({k[4:-8] for k in history[-1] if k.startswith("val_") and k.endswith("_age_mae") and k != "val_age_mae"})
    for k, name in enumerate(sources):
        axes[1].plot(ep, [h[f"val_{name}_age_mae"] for h in history], "o-", color=f"C{k + 1}", label=name)
        if not math.isnan(history[-1].get(f"val_{name}_gender_acc", float("nan"))):
            axes[2].plot(ep, [100 * h[f"val_{name}_gender_acc"] for h in history], "o-", color=f"C{k + 1}", label=name)
    if len(sources) > 1:
        axes[1].plot(ep, [h["val_age_mae"] for h in history], "k--", label="mean (selects the epoch)")
    axes[1].set_title("validation age MAE (years)")
    axes[2].set_title("validation gender accuracy (%)")
    for a in axes[1:]:
        if a.lines:
            a.legend(fontsize=8)
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def setup_processes(cfg):
    """(distributed, rank, world, device, amp dtype) for a plain run or one under torchrun."""
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    want_cuda = (cfg.device or default_device()).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        fail("--device cuda asked for, but no CUDA device is available")
    rank, world, local_rank = 0, 1, 0
    if distributed:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif distributed:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return distributed, rank, world, device, autocast_dtype(device, verbose=rank == 0)


def autocast_dtype(device, verbose=False):
    """bf16 autocast where the hardware runs bf16 natively (a recent GPU; a CPU with AVX-512 bf16 or AMX),
    fp16 on an older GPU (with a gradient scaler), else None: fp32. A CPU without native bf16 emulates it,
    many times slower than fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_has_bf16():
        return torch.bfloat16
    if verbose:
        print(f"this CPU has no native bf16 ({torch.backends.cpu.get_cpu_capability()}), so training runs in fp32")
    return None


def cpu_has_bf16():
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 bf16 or AMX) rather than emulating it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def build_data(cfg, rank, world, main_proc):
    """The training loader over every --cache (mixed by --source-weights) and one validation set per cache."""
    if not cfg.cache:
        found = sorted(glob.glob(os.path.join(config.DATA_DIR, "*", "cache.json")))
        cfg.cache = tuple(os.path.relpath(os.path.dirname(p)) for p in found)
        if not cfg.cache:
            fail(f"no --cache given and no cache in {os.path.relpath(config.DATA_DIR)}/: make one with pre_process.py "
                 "(README: Train on your own photos)")
        if main_proc:
            print(f"no --cache given: training on every cache in {os.path.relpath(config.DATA_DIR)}/: {' '.join(cfg.cache)}")
    check_shares("--source-weights", cfg.source_weights, len(cfg.cache), "cache(s)")
    if len(cfg.balance) not in (1, len(cfg.cache)) or not all(0 <= b <= 1 for b in cfg.balance):
        fail(f"--balance must be between 0 and 1, one value or one per --cache ({len(cfg.cache)}), got {' '.join(map(str, cfg.balance))}")
    if len(cfg.aug_scale) != 2 or not 0 < cfg.aug_scale[0] <= cfg.aug_scale[1] <= 4:
        fail(f"--aug-scale takes LO HI with 0 < LO <= HI <= 4, got {list(cfg.aug_scale)}")
    shares = {"--hard-aug": cfg.hard_aug, "--pose-aug": cfg.pose_aug, "--hard-harsh": cfg.hard_harsh, "--neighbour-aug": cfg.neighbour_aug,
              "--sharpen-aug": cfg.sharpen_aug}
    if not all(0 <= v <= 1 for v in shares.values()):
        fail(f"{', '.join(shares)} are shares between 0 and 1, got {', '.join(str(v) for v in shares.values())}")
    if cfg.teacher_view == "clean" and not cfg.teacher:
        fail("--teacher-view clean needs --teacher")
    try:
        sources = [FaceCache(c, split="train", train=True, seed=cfg.seed) for c in cfg.cache]
        val_sets = [FaceCache(c, split="val", train=False) for c in cfg.cache]
    except CacheError as e:
        fail(str(e))
    names = [v.name for v in val_sets]
    if len(set(names)) < len(names):
        names = [f"{n}{k}" for k, n in enumerate(names)]  # two caches in folders of the same name
    train_set = MixedFaces(sources, fill_outside=cfg.fill_outside, aug_scale=cfg.aug_scale, hard_aug=cfg.hard_aug,
                           pose_aug=cfg.pose_aug, turned_weight=cfg.turned_weight, balance=cfg.balance,
                           clean_view=cfg.teacher_view == "clean", hard_harsh=cfg.hard_harsh, neighbour_aug=cfg.neighbour_aug,
                           sharpen_aug=cfg.sharpen_aug)
    if len(train_set) < cfg.batch_size * world:
        fail(f"{', '.join(cfg.cache)}: only {len(train_set)} training faces, fewer than one batch of {cfg.batch_size * world}")
    train_loader, train_sampler = make_loader(train_set, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world,
                                              workers=cfg.workers, source_weights=list(cfg.source_weights) or None,
                                              passes=passes_per_epoch(len(train_set), cfg, world))
    val = []
    if main_proc:  # rank 0 validates
        val = [(name, v, make_loader(v, 256, workers=min(2, cfg.workers))[0]) for name, v in zip(names, val_sets)]
    return train_set, train_loader, train_sampler, val, sum(len(v) for v in val_sets)


def passes_per_epoch(n, cfg, world):
    """How many times an epoch passes over the n training faces: once, or as often as a small set needs for
    the run to train at least --min-steps steps."""
    passes = 1
    while math.ceil(math.ceil(n * passes / world) / cfg.batch_size) * cfg.epochs < cfg.min_steps:
        passes += 1
    return passes


def validate(model, val, device, amp_dtype, cfg):
    """Metrics of every validation set, as flat `<source>_<metric>` keys, plus the selection figures:
    age_mae is the mean of the sources' MAE (each source counts the same, however many faces it has,
    so the small in-the-wild set weighs as much as the large one), gender_acc the mean over the sources
    that have gender labels."""
    flat, maes, accs = {}, [], []
    for name, val_set, loader in val:
        m = evaluate(model, val_set, loader, device, amp_dtype, cfg.eval_tta)
        flat.update({f"{name}_{k}": v for k, v in m.items() if k not in ("n", "n_gender")})
        maes.append(m["age_mae"])
        if m["n_gender"]:
            accs.append(m["gender_acc"])
    flat["age_mae"] = float(np.mean(maes))
    flat["gender_acc"] = float(np.mean(accs)) if accs else float("nan")
    return flat


def build_model(cfg, device, from_pretrained=True):
    """The network, its first --freeze-stages stages frozen, in channels_last (the faces come NHWC)."""
    try:
        net = AgeGenderNet(cfg.arch, pretrained=cfg.pretrained if from_pretrained else "", dropout=config.DROPOUT,
                           two_ages=cfg.two_ages).to(device)
    except (ValueError, OSError, RuntimeError) as e:
        fail(f"--pretrained {cfg.pretrained}: {str(e).splitlines()[0]}")
    try:
        net.freeze_stages(cfg.freeze_stages)
    except ValueError as e:
        fail(str(e))
    return net.to(memory_format=torch.channels_last)


def build_optimizer(cfg, net, total_steps, warmup_steps):
    """AdamW over the trained parameters (weight decay on weights, not on biases and norms) and its schedule."""
    trained = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim > 1], "weight_decay": config.WEIGHT_DECAY},
              {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, warmup_steps, cfg))


def batch_loss(model, teachers, batch, cfg, device, amp_dtype, distill_share, apparent_source):
    """(the joint loss of one training batch, its size): the network's forward pass and, with --teacher, the
    teachers' distributions, each face's distillation share and age output chosen by its source."""
    x, age, gender, source, span, *clean = batch
    x = x.to(device, non_blocking=True)
    # --teacher-view clean: the teachers read the faces before the real conditions
    x_teacher = clean[0].to(device, non_blocking=True) if clean else x
    x = x.contiguous(memory_format=torch.channels_last)
    x_teacher = x_teacher.contiguous(memory_format=torch.channels_last)
    span, gender, source = (t.to(device, non_blocking=True) for t in (span, gender, source))
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x)
    soft = teachers(x_teacher, amp_dtype) if teachers is not None else None
    share = distill_share[source] if soft is not None else None
    return joint_loss(logits, span, gender, cfg, apparent_source[source], soft, share), len(x)


def update(loss, net, opt, sched, scaler):
    """One optimizer step on the loss: backward (scaled where fp16 needs it), the gradient norm clipped."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), config.GRAD_CLIP)
    scaler.step(opt)
    scaler.update()
    sched.step()


def main(argv=None):
    cfg = parse_config(config.TrainConfig, argv, description=__doc__.split("\n")[0], choices=CHOICES)
    distributed, rank, world, device, amp_dtype = setup_processes(cfg)
    main_proc = rank == 0
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")
    resuming = cfg.resume and os.path.isfile(last_path)
    if cfg.resume and not resuming and main_proc:
        print(f"--resume: no checkpoint at {last_path} yet, so this starts a fresh run")
    if cfg.freeze_stages < 0:
        cfg.freeze_stages = config.FREEZE_STAGES.get(cfg.arch, 0)
    resume_ckpt = read_resume_checkpoint(last_path, cfg) if resuming else None
    if resume_ckpt is not None and (resume_ckpt["epoch"] >= cfg.epochs or (cfg.max_steps and resume_ckpt["step"] >= cfg.max_steps)):
        # before the data and the teachers are loaded: a finished stage of a recipe costs only this
        if main_proc:
            print(f"resumed from {last_path}: epoch {resume_ckpt['epoch']}, step {resume_ckpt['step']}; "
                  "the run is already complete, nothing to do")
        return finish(distributed, None, main_proc)

    # --- data
    train_set, train_loader, train_sampler, val, n_val = build_data(cfg, rank, world, main_proc)
    steps_per_epoch = len(train_sampler)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    # --- model, optimizer, schedule
    net = build_model(cfg, device, from_pretrained=not resuming)
    if main_proc:  # what this run trains, in one line
        shares = (" in shares " + " / ".join(f"{w:g}" for w in cfg.source_weights)) if cfg.source_weights else " (shares by size)"
        mix = ", ".join(f"{s.name} {len(s):,}" for s in train_set.sources)
        print(f"training {cfg.arch} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, {net.init_source}; "
              f"first {cfg.freeze_stages} trunk stages frozen) on train faces {mix}{shares}; {n_val:,} val faces; "
              f"{cfg.epochs} epochs of {steps_per_epoch} steps of {cfg.batch_size * world}"
              + (f" (each epoch passes over the {len(train_set):,} faces {train_sampler.passes} times, so that the run trains at "
                 f"least --min-steps {cfg.min_steps})" if train_sampler.passes > 1 else "") + f", lr {cfg.lr:g}; "
              f"{world} process(es) on {device}; writing to {cfg.out_dir}")
    opt, sched = build_optimizer(cfg, net, total_steps, warmup_steps)
    ema = WeightAverage(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    distill_share = distill_shares(cfg).to(device)
    # which sources' labels are apparent ages (per --cache): with two ages they train the apparent output
    apparent_source = torch.tensor([s.age_kind == "apparent" for s in train_set.sources], device=device)
    teachers = Teachers(cfg.teacher, cfg.teacher_weights, device, cfg.teacher_tta) if cfg.teacher else None
    teacher_metrics = {}
    if teachers is not None and main_proc:  # what the network is to learn, on the same validation
        teacher_metrics = validate(teachers, val, device, amp_dtype, cfg)
        print("teachers on validation: " + "  ".join(f"{k} {v:.4f}" for k, v in teacher_metrics.items()))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # --- resume
    step, epoch, batch_in_epoch, best_mae, history = 0, 0, 0, float("inf"), []
    if resuming:
        step, epoch, batch_in_epoch, best_mae, history = restore_resume_state(resume_ckpt, last_path, net, opt, sched, scaler,
                                                                              ema, device)
        if main_proc:
            print(f"resumed from {last_path}: epoch {epoch}, step {step}")

    model = net
    if cfg.compile:
        model = torch.compile(model)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(path, metrics=None):
        # "ema" (when on) holds the weights to use; load_checkpoint prefers it, "model" is for --resume
        state = {"model": net.state_dict(), "ema": ema.model.state_dict() if ema else None,
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "best_mae": best_mae, "history": history, "config": dataclasses.asdict(cfg), "metrics": metrics or {},
                 "teacher_metrics": teacher_metrics,
                 # the test-time views validation used: demo.py and evaluate.py predict with them by default
                 "tta": cfg.eval_tta, "tta_zoom": config.TTA_ZOOM,
                 "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        atomic_torch_save(state, path)

    def stop_on_bad_loss(loss_value):
        msg = (f"loss became {loss_value} at step {step} (epoch {epoch}): stopping without saving; "
               f"the last good checkpoint is {last_path if os.path.exists(last_path) else 'none'}")
        if main_proc:
            print(f"error: {msg}", file=sys.stderr)
        sys.exit(3)

    # --- train
    log_path = os.path.join(cfg.out_dir, "log.csv")
    while epoch < cfg.epochs:
        train_sampler.set_epoch(epoch, batch_in_epoch)
        model.train()
        loss_sum, seen, t0 = torch.zeros((), device=device), 0, time.time()
        bar = tqdm(train_loader, total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=not main_proc, dynamic_ncols=True)
        for batch in bar:
            loss, n = batch_loss(model, teachers, batch, cfg, device, amp_dtype, distill_share, apparent_source)
            # checking every step costs a GPU sync; every 10 steps (and before every save) bounds the damage
            if (device.type != "cuda" or step % 10 == 0) and not torch.isfinite(loss):
                stop_on_bad_loss(loss.item())
            update(loss, net, opt, sched, scaler)
            if ema is not None:
                ema.update(step)
            step += 1
            batch_in_epoch += 1
            loss_sum += loss.detach() * n
            seen += n
            if main_proc and step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                img_s=f"{seen * world / (time.time() - t0):.0f}")
            stop_now = cfg.max_steps and step >= cfg.max_steps
            if step % cfg.ckpt_every == 0 or stop_now:
                if not torch.isfinite(loss_sum):
                    stop_on_bad_loss(float("nan"))
                if main_proc:
                    save(last_path)
            if stop_now:
                if main_proc:
                    print(f"stopped at --max-steps {cfg.max_steps}; --resume continues from {last_path}")
                return finish(distributed, net, main_proc)
        bar.close()
        if distributed:  # average the training loss over ranks for the log
            packed = torch.stack([loss_sum, torch.tensor(float(seen), device=device)])
            dist.all_reduce(packed)
            loss_sum, seen = packed[0], int(packed[1].item())
        train_loss = loss_sum.item() / max(1, seen)
        if not math.isfinite(train_loss):
            stop_on_bad_loss(train_loss)
        epoch += 1
        batch_in_epoch = 0
        if main_proc:
            metrics = validate(ema.model if ema else net, val, device, amp_dtype, cfg)
            row = {"epoch": epoch, "step": step, "train_loss": round(train_loss, 4), "lr": sched.get_last_lr()[0],
                   "epoch_s": round(time.time() - t0, 1), **{f"val_{k}": round(v, 4) for k, v in metrics.items()}}
            history.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()))
            improved = metrics["age_mae"] < best_mae
            if improved:
                best_mae = metrics["age_mae"]
            save(last_path, metrics)
            if improved:
                save(best_path, metrics)
            write_log(history, log_path)
            plot_curves(history, os.path.join(cfg.out_dir, "curves.png"))
        if distributed:
            dist.barrier()
    if main_proc and history:
        best = min(history, key=lambda h: h["val_age_mae"])
        print(f"done: best validation MAE {best['val_age_mae']:.3f}, gender accuracy {100 * best['val_gender_acc']:.2f}% "
              f"(epoch {best['epoch']}), saved to {best_path}")
    return finish(distributed, net, main_proc)


def read_resume_checkpoint(last_path, cfg):
    """last.pt, once its config is known to be this run's; a checkpoint of another config, or one that is
    unusable, is refused in one line."""
    try:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
        for key in ("distill_weight", "balance"):  # written when each was one number for all sources
            if isinstance(saved.get(key), (int, float)):
                saved[key] = (saved[key],)
        now = dataclasses.asdict(cfg)
        diff = sorted(k for k, v in now.items() if k not in RESUME_MAY_CHANGE and _comparable(saved.get(k, _DEFAULTS.get(k))) != _comparable(v))
        int(ckpt["epoch"]), int(ckpt["step"])  # main() reads them before anything else is restored
    except Exception as e:  # unpickling errors come in many types; any of them means "not usable"
        fail(f"--resume: {last_path} is not a usable checkpoint ({str(e).splitlines()[0][:160]})")
    if diff:
        fail(f"--resume: {last_path} was trained with another config ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)})")
    return ckpt


def restore_resume_state(ckpt, last_path, net, opt, sched, scaler, ema, device):
    """Everything a run needs to go on where it stopped, from last.pt as read_resume_checkpoint read it."""
    try:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.model.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        return ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_mae"], ckpt["history"]
    except Exception as e:
        fail(f"--resume: {last_path} is not a usable checkpoint ({str(e).splitlines()[0][:160]})")


_DEFAULTS = dataclasses.asdict(config.TrainConfig())  # for options added after a checkpoint was written


def _comparable(v):
    return tuple(v) if isinstance(v, list) else v


def write_log(history, path):
    fields = list(dict.fromkeys(k for h in history for k in h))
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(history)
    os.replace(path + ".tmp", path)


def finish(distributed, net, main_proc):
    """With DDP, check that every rank ended with the same weights (they must; net None: nothing was trained),
    then shut down."""
    if distributed and net is not None:
        flat = torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])
        spread = flat.clone()
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        spread -= flat
        gap = spread.abs().max()
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if main_proc:
            print(f"DDP: {dist.get_world_size()} ranks, largest weight difference between ranks {gap.item():.3g}")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
