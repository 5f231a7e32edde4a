"""A local web app and REST API: drop photos or turn on the webcam in a browser, or POST photos.

    python serve.py                                  # http://127.0.0.1:8000 (the page; /docs: the API)
    python serve.py --port 8080 --workers 2          # two processes, each with its own model
    python serve.py --host 0.0.0.0                   # listen on every interface (only where you mean it)
    curl -F file=@photo.jpg http://127.0.0.1:8000/api/analyze
    curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/api/analyze?distribution=true'

GET / is the page (web/: every script and style served by the app itself, nothing from the internet).
POST /api/analyze takes one photo, as a multipart upload (field `file`) or as the raw body, and answers
with the record demo.py --json writes for a photo: {"file", "faces": [...], "width", "height"}; query
options: detector (mtcnn | yunet | retinaface), tta, distribution (each face's P(age = 0..100)) and
crops (each face's aligned 112x96 crop as a PNG data URL, for the page). POST /api/track?session=ID
does the same for webcam frames and holds each person's label steady across frames (tracker.py).
GET /api/health says the server is up and which model it runs; /docs is the OpenAPI page.

Bad input is answered with a 4xx and {"error": "..."} naming the reason, never a 500: not an image,
truncated, empty, over --max-upload-mb (413), over --max-pixels (413); a photo without a face is a 200
with no faces. Requests wait their turn in a bounded queue (--queue-size); past it, or after waiting
--queue-timeout seconds, a request gets a 503 with a Retry-After header. While requests wait, the faces
of several photos go through the network together (--max-batch, --max-wait-ms; batching.py), each photo
answered exactly as it would be alone. GET /metrics gives Prometheus counters (requests by route and
status, latency, queue depth, batch sizes, faces found); every request gets an access-log line (quiet
with --log-level warning); on SIGTERM the requests in flight finish before the server stops.
Uploads are held in memory only; clients never name a file on the server; only checkpoints of this
project are loaded, with weights_only=True.
"""
import argparse
import asyncio
import base64
import ctypes
import io
import logging
import os
import sys
import threading
import time
from collections import OrderedDict

import cv2

import config
from batching import BatchQueue, QueueFull, QueueTimeout
from detector import DETECTORS
from utils import InputError, read_photo

WEB = os.path.join(config.ROOT, "web")
LOG = logging.getLogger("serve")
# the queue's defaults: room for 64 requests waiting per process (32 clients at once are served without a
# refusal), none waiting longer than 30 s, and up to 16 photos' faces through the network together, a batch
# waiting at most 2 ms for more once its first request is in (bench.py serve measures them)
QUEUE_SIZE, QUEUE_TIMEOUT_S, MAX_BATCH, MAX_WAIT_MS = 64, 30.0, 16, 2.0
MAX_SESSIONS = 32  # webcam sessions (a tracker each) kept at once; the least recently used goes first
SESSION_IDLE_S = 120  # a session unused this long is dropped


class Pipelines:
    """One AgeGenderPredictor per (detector, views) asked for, built on first use. Each request's faces are
    found in the request's own thread, by one of a few detectors kept for the purpose (a detector serves one
    thread at a time); the network runs one batch of requests at a time (run_batch: cv2's networks are not
    thread-safe), the faces of the whole batch together (AgeGenderPredictor.predict_found)."""

    def __init__(self, checkpoint, detector, device="cpu", detectors=2):
        from models import load_checkpoint

        self.checkpoint, self.detector, self.device = checkpoint, detector, device
        load_checkpoint(checkpoint)  # a bad checkpoint fails at start, in one line, not at the first request
        self.predictors, self.lock = {}, threading.Lock()
        self.free_detectors, self.detector_slots = {}, threading.BoundedSemaphore(detectors)
        self.sessions = OrderedDict()

    def get(self, detector, tta):
        from predictor import AgeGenderPredictor

        key = (detector or self.detector, tta)
        with self.lock:
            if key not in self.predictors:
                self.predictors[key] = AgeGenderPredictor(self.checkpoint, self.device, tta=tta, detector=key[0])
            return self.predictors[key]

    def find_faces(self, key, photo):
        """(faces, aligned crops) of one photo, by a detector of the key's kind that no other thread is using."""
        predictor = self.get(*key)
        with self.detector_slots:
            with self.lock:
                pool = self.free_detectors.setdefault(key[0], [])
                detector = pool.pop() if pool else None
            detector = detector or predictor.new_detector()
            try:
                return predictor.find_faces(photo, detector=detector)
            finally:
                with self.lock:
                    pool.append(detector)

    def run_batch(self, key, requests):
        """The records of a batch of requests (photo, found faces, distribution, crops, session) of one
        (detector, views) key: each exactly what its photo gets alone."""
        predictor = self.get(*key)
        out = []
        for (photo, _, distribution, crops, session), found in zip(requests, predictor.predict_found([r[1] for r in requests],
                                                                                                   distribution=True)):
            state = self.tracker(session, predictor) if session is not None else None
            out.append(record_of(photo, *found, distribution, crops, state))
        return out

    def tracker(self, session, predictor):
        """The webcam session's [tracker, last used, frames seen]: a bounded number, the idle ones dropped."""
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v[1] > SESSION_IDLE_S]:
            del self.sessions[sid]
        if session not in self.sessions:
            if len(self.sessions) >= MAX_SESSIONS:
                self.sessions.popitem(last=False)
            tracker = predictor.tracker(max_lost=5)
            self.sessions[session] = [tracker, now, 0]
        state = self.sessions[session]
        state[1] = now
        self.sessions.move_to_end(session)
        return state


def crop_data_url(crop):
    ok, png = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode() if ok else None


def record_of(photo, records, aligned, distribution, crops, session=None):
    """The demo's record of one photo from its FaceRecords and aligned crops (and, with a webcam session,
    each face's track and its steady label)."""
    faces = [r.to_dict() for r in records]
    if session is not None:
        tracker = session[0]
        ids = tracker.update(session[2], faces)
        session[2] += 1
        for f, tid in zip(faces, ids):
            f["track"] = tid
            f["track_label"] = tracker.tracks[tid].summary()
    if not distribution:  # computed for the tracker; sent only when asked for
        for f in faces:
            f.pop("age_distribution", None)
            f.pop("apparent_age_distribution", None)
    if crops:
        for f, c in zip(faces, aligned):
            f["crop"] = crop_data_url(c)
    return {"faces": faces, "width": int(photo.size[0]), "height": int(photo.size[1])}


def create_app(checkpoint=config.RELEASED_MODEL, detector=config.DETECTOR, max_upload_mb=20.0, max_pixels=40_000_000,
               queue_size=QUEUE_SIZE, queue_timeout=QUEUE_TIMEOUT_S, max_batch=MAX_BATCH, max_wait_ms=MAX_WAIT_MS, device="cpu",
               pipelines=None):
    """The FastAPI app (serve.py's main runs it under uvicorn; tests call it directly, and may hand it their
    own `pipelines`: anything with a `detector` name, find_faces(key, photo) and run_batch(key, requests))."""
    from fastapi import FastAPI, Query, Request

    limit = int(max_upload_mb * 2**20)
    pipelines = pipelines or Pipelines(checkpoint, detector, device)
    metrics = ServerMetrics()
    queue = BatchQueue(pipelines.run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                       queue_timeout=queue_timeout, on_batch=metrics.batch_done)
    metrics.queue_depth.set_function(lambda: queue.depth)
    app = FastAPI(title="Age and gender from a face photo", version="1.0",
                  description="The REST API of this repository's model: POST a photo, get each face's box, gender and age.")
    limits = {"max_upload_bytes": limit, "max_pixels": max_pixels, "queue_size": queue_size, "queue_timeout_s": queue_timeout,
              "max_batch": max_batch, "max_wait_ms": max_wait_ms}
    add_plumbing(app, metrics)

    async def handle(request, detector, tta, distribution, crops, session=None):
        if detector and detector not in DETECTORS:
            return error(400, f"unknown detector '{detector}' (choose from {', '.join(sorted(DETECTORS))})")
        name, data = await read_upload(request, limit)
        if name is None:
            return data
        photo, bad = await asyncio.to_thread(decode, data, max_pixels)
        if bad is not None:
            return bad
        key = (detector or pipelines.detector, tta)
        try:
            queue.check_room()  # refused before any work is spent on it
            found = await asyncio.to_thread(pipelines.find_faces, key, photo)  # the network's part waits for a batch
            record = await queue.submit(key, (photo, found, distribution, crops, session))
        except (QueueFull, QueueTimeout) as e:
            return error(503, f"busy: {e}; try again in a moment", headers={"Retry-After": str(queue.retry_after())})
        except InputError as e:  # a large JPEG whose full pixels, decoded for a small face, are broken
            return error(400, str(e))
        return {"file": name, **record}

    @app.get("/api/health")
    async def health():  # on the event loop, not in the thread pool: it answers while the queue is full
        return {"status": "ok", "checkpoint": os.path.basename(checkpoint), "detector": pipelines.detector,
                "queue_depth": queue.depth, **limits}

    @app.post("/api/analyze")
    async def analyze(request: Request,
                      detector: str = Query("", description="mtcnn, yunet or retinaface (default: the server's)"),
                      tta: bool = Query(None, description="average four views of each face (default: the model's own)"),
                      distribution: bool = Query(False, description="add each face's P(age = 0..100)"),
                      crops: bool = Query(False, description="add each face's aligned 112x96 crop as a PNG data URL")):
        """One photo (multipart field `file`, or the raw body) -> the record demo.py --json writes for it."""
        return await handle(request, detector, tta, distribution, crops)

    @app.post("/api/track")
    async def track(request: Request, session: str = Query(..., max_length=64, description="the client's webcam session"),
                    detector: str = Query(""), crops: bool = Query(False)):
        """One webcam frame: as /api/analyze, each face with its track id and the track's steady label."""
        return await handle(request, detector, None, False, crops, session=session)

    return app


def error(status, message, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_upload(request, limit):
    """(file name, bytes) of the photo: a multipart field `file`, or the raw body; or (None, an error response)."""
    from starlette.formparsers import MultiPartParser

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None, error(413, f"upload too large ({int(declared):,} bytes, limit {limit:,})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None, error(413, f"upload too large (over {limit:,} bytes)")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        async def once():
            yield bytes(body)

        # a multipart upload stays in memory up to this size (Starlette spools larger parts to a temporary
        # file); the body was refused past `limit` before it was parsed, so nothing uploaded is written to disk
        MultiPartParser.spool_max_size = limit + 1
        try:
            form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=10).parse()
        except Exception as e:  # a malformed multipart body: the client's fault
            return None, error(400, f"malformed multipart upload ({str(e)[:120]})")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return None, error(400, "multipart upload without a file field named 'file'")
        return os.path.basename(upload.filename or "upload"), await upload.read()
    return "upload", bytes(body)


def decode(data, max_pixels):
    """(utils.Photo, None) of an uploaded photo, or (None, a 4xx error response) naming the reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        if w * h > max_pixels:
            return None, error(413, f"image too large ({w}x{h} pixels, limit {max_pixels:,})")
    except Exception:
        pass  # not an image, or a broken one: read_photo names the reason
    try:
        return read_photo(data, max_pixels=max_pixels), None
    except InputError as e:
        return None, error(400, str(e))


class ServerMetrics:
    """What GET /metrics shows, in the Prometheus text format: requests by route and status, their latency,
    the queue's depth, the batches' sizes (photos and faces) and the faces found. A registry per app, so
    that several apps in one process (the tests) count apart."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "Requests answered, by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "Time from request to answer, by route", ["route"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry)
        self.queue_depth = Gauge("queue_depth", "Requests waiting for their turn", registry=self.registry)
        self.batch_photos = Histogram("batch_photos", "Photos analysed together in one batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                                      registry=self.registry)
        self.batch_faces = Histogram("batch_faces", "Faces through the network together in one batch",
                                     buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.faces = Counter("faces_found", "Faces found in the photos analysed", registry=self.registry)

    def batch_done(self, key, items, results, seconds):
        found = sum(len(r["faces"]) for r in results if isinstance(r, dict))
        self.batch_photos.observe(len(items))
        self.batch_faces.observe(found)
        self.faces.inc(found)

    def text(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def add_plumbing(app, metrics):
    """The page, its static files, /metrics, the access log and the JSON answer to anything unexpected."""
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles
    from prometheus_client import CONTENT_TYPE_LATEST

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(WEB, "index.html"))

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(AccessLog, metrics=metrics)


class AccessLog:
    """ASGI middleware: one access-log line per request (method, route, status, ms) and its counts in
    /metrics; an exception that escapes a route becomes one JSON line with a 500, and the server goes on.
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which costs a task and a stream per request."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as e:
            from fastapi.responses import JSONResponse

            await JSONResponse({"error": f"internal error ({type(e).__name__})"}, status_code=500)(scope, receive, send)
        seconds = time.perf_counter() - started
        path = scope["path"]
        route = getattr(scope.get("route"), "path", None) or ("/static" if path.startswith("/static") else "other")
        self.metrics.requests.labels(route, str(status[0])).inc()
        self.metrics.latency.labels(route).observe(seconds)
        LOG.info("%s %s %d %.1f ms", scope["method"], path, status[0], 1000 * seconds)


def limit_malloc_arenas(arenas=2):
    """glibc gives every thread that allocates its own malloc arena, and a server that decodes photos in a pool
    of threads grows by the arenas' unreturned pages; a couple of arenas keep its memory flat under load."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to limit
        pass


def wait_until_healthy(url, seconds=60):
    """Polls `url`/api/health until the server answers 200: for a client of a server just started (it loads
    its model first), as the tests and bench.py serve are."""
    import httpx

    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url}: no answer from /api/health in {seconds} s")


def app_from_env():
    """The app uvicorn's worker processes build (--workers > 1): its settings come through the environment."""
    limit_malloc_arenas()
    env = os.environ
    if env.get("SERVE_THREADS"):
        import torch

        torch.set_num_threads(int(env["SERVE_THREADS"]))
        cv2.setNumThreads(int(env["SERVE_THREADS"]))
    logging.basicConfig(level=env.get("SERVE_LOG_LEVEL", "info").upper(), format="%(message)s")
    return create_app(env.get("SERVE_CHECKPOINT", config.RELEASED_MODEL), env.get("SERVE_DETECTOR", config.DETECTOR),
                      float(env.get("SERVE_MAX_UPLOAD_MB", 20)), int(env.get("SERVE_MAX_PIXELS", 40_000_000)),
                      int(env.get("SERVE_QUEUE_SIZE", QUEUE_SIZE)), float(env.get("SERVE_QUEUE_TIMEOUT", QUEUE_TIMEOUT_S)),
                      int(env.get("SERVE_MAX_BATCH", MAX_BATCH)), float(env.get("SERVE_MAX_WAIT_MS", MAX_WAIT_MS)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every interface")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model (memory x N)")
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="the model to serve (a checkpoint of this project)")
    p.add_argument("--detector", default=config.DETECTOR, choices=sorted(DETECTORS), help="the face detector, unless a request names one")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (413 beyond)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest photo accepted, in pixels (413 beyond)")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                   help="requests that may wait for their turn, per process; beyond them a 503 with Retry-After")
    p.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT_S, help="seconds a request may wait in the queue before a 503")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="photos whose faces go through the network together")
    p.add_argument("--max-wait-ms", type=float, default=MAX_WAIT_MS,
                   help="how long a batch waits for more requests to join it once the first has arrived")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="info: one access-log line per request (method, route, status, ms); warning: quiet")
    args = p.parse_args(argv)
    import uvicorn

    from models import CheckpointError, load_checkpoint
    from utils import fail

    if min(args.queue_size, args.max_batch) < 1 or args.queue_timeout <= 0 or args.max_wait_ms < 0:
        fail("--queue-size and --max-batch must be at least 1, --queue-timeout above 0 and --max-wait-ms at least 0")
    try:
        load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        fail(str(e))
    os.environ.update(SERVE_CHECKPOINT=args.checkpoint, SERVE_DETECTOR=args.detector, SERVE_MAX_UPLOAD_MB=str(args.max_upload_mb),
                      SERVE_MAX_PIXELS=str(args.max_pixels), SERVE_QUEUE_SIZE=str(args.queue_size),
                      SERVE_QUEUE_TIMEOUT=str(args.queue_timeout), SERVE_MAX_BATCH=str(args.max_batch),
                      SERVE_MAX_WAIT_MS=str(args.max_wait_ms), SERVE_LOG_LEVEL=args.log_level)
    # uvicorn's own access log is off: the app writes one line per request (its level set by --log-level);
    # on SIGTERM uvicorn stops listening, lets the requests in flight finish, then exits
    common = dict(host=args.host, port=args.port, log_level="warning", access_log=False, timeout_graceful_shutdown=60)
    if args.workers > 1:  # each process builds its own app (and model) from the environment, on its share of the cores
        os.environ["SERVE_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
        uvicorn.run("serve:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(app_from_env(), **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
