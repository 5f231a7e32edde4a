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
with no faces. Beyond --max-concurrent requests in flight a request gets a 503 at once, not a place in
an endless queue. Uploads are held in memory only; clients never name a file on the server; only
checkpoints of this project are loaded, with weights_only=True.
"""
import argparse
import asyncio
import base64
import io
import os
import sys
import threading
import time
from collections import OrderedDict

import cv2

import config
from detector import DETECTORS
from tracker import FaceTracker
from utils import InputError, read_image_bytes

WEB = os.path.join(config.ROOT, "web")
MAX_SESSIONS = 32  # webcam sessions (a tracker each) kept at once; the least recently used goes first
SESSION_IDLE_S = 120  # a session unused this long is dropped


class Busy(Exception):
    pass


class Pipelines:
    """One AgeGenderPredictor per (detector, views) asked for, built on first use; the model work of this
    process runs one request at a time (cv2's networks are not thread-safe, and two requests at once
    would only share the same cores), while up to `max_concurrent` requests wait for their turn."""

    def __init__(self, checkpoint, detector, max_concurrent, device="cpu"):
        from models import load_checkpoint

        self.checkpoint, self.detector, self.device = checkpoint, detector, device
        load_checkpoint(checkpoint)  # a bad checkpoint fails at start, in one line, not at the first request
        self.predictors, self.lock = {}, threading.Lock()
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.sessions = OrderedDict()

    def get(self, detector, tta):
        from predictor import AgeGenderPredictor

        key = (detector or self.detector, tta)
        if key not in self.predictors:
            self.predictors[key] = AgeGenderPredictor(self.checkpoint, self.device, tta=tta, detector=key[0])
        return self.predictors[key]

    def run(self, fn):
        """fn() under the model lock, if a slot is free; else Busy (a 503)."""
        if not self.slots.acquire(blocking=False):
            raise Busy
        try:
            with self.lock:
                return fn()
        finally:
            self.slots.release()

    def tracker(self, session, predictor):
        """The webcam session's [tracker, last used, frames seen]: a bounded number, the idle ones dropped."""
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if now - v[1] > SESSION_IDLE_S]:
            del self.sessions[sid]
        if session not in self.sessions:
            if len(self.sessions) >= MAX_SESSIONS:
                self.sessions.popitem(last=False)
            tracker = FaceTracker(max_lost=5, age_std_scale=(predictor.calibration or {}).get("age_std_scale", 1.0),
                                  age_estimate=predictor.age_estimate, unsure_below=predictor.unsure_below)
            self.sessions[session] = [tracker, now, 0]
        state = self.sessions[session]
        state[1] = now
        self.sessions.move_to_end(session)
        return state


def crop_data_url(crop):
    ok, png = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode() if ok else None


def analyse(predictor, rgb, distribution, crops, session=None):
    """The demo's record of one photo (and, with a webcam session, each face's track and its steady label)."""
    records, aligned = predictor.analyse(rgb, distribution=distribution or session is not None)
    faces = [r.to_dict() for r in records]
    if session is not None:
        tracker = session[0]
        ids = tracker.update(session[2], faces)
        session[2] += 1
        for f, tid in zip(faces, ids):
            f["track"] = tid
            f["track_label"] = tracker.tracks[tid].summary()
            if not distribution:
                del f["age_distribution"]
    if crops:
        for f, c in zip(faces, aligned):
            f["crop"] = crop_data_url(c)
    return {"faces": faces, "width": int(rgb.shape[1]), "height": int(rgb.shape[0])}


def create_app(checkpoint=config.RELEASED_MODEL, detector=config.DETECTOR, max_upload_mb=20.0, max_pixels=40_000_000,
               max_concurrent=4, device="cpu"):
    """The FastAPI app (serve.py's main runs it under uvicorn; tests call it directly)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.formparsers import MultiPartParser

    limit = int(max_upload_mb * 2**20)
    # a multipart upload stays in memory up to this size (Starlette spools larger parts to a temporary file);
    # the body is refused past `limit` before it is parsed, so nothing uploaded is ever written to disk
    MultiPartParser.spool_max_size = limit + 1
    pipelines = Pipelines(checkpoint, detector, max_concurrent, device)
    app = FastAPI(title="Age and gender from a face photo", version="1.0",
                  description="The REST API of this repository's model: POST a photo, get each face's box, gender and age.")

    def error(status, message):
        return JSONResponse({"error": message}, status_code=status)

    async def read_upload(request):
        """(file name, bytes) of the photo: a multipart field `file`, or the raw body; or an error response."""
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

            try:
                form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=10).parse()
            except Exception as e:  # a malformed multipart body: the client's fault
                return None, error(400, f"malformed multipart upload ({str(e)[:120]})")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return None, error(400, "multipart upload without a file field named 'file'")
            return os.path.basename(upload.filename or "upload"), await upload.read()
        return "upload", bytes(body)

    def decode(data):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            if w * h > max_pixels:
                return None, error(413, f"image too large ({w}x{h} pixels, limit {max_pixels:,})")
        except Exception:
            pass  # not an image, or a broken one: read_image_bytes names the reason
        try:
            return read_image_bytes(data, max_pixels=max_pixels), None
        except InputError as e:
            return None, error(400, str(e))

    async def handle(request, detector, tta, distribution, crops, session=None):
        if detector and detector not in DETECTORS:
            return error(400, f"unknown detector '{detector}' (choose from {', '.join(sorted(DETECTORS))})")
        name, data = await read_upload(request)
        if name is None:
            return data
        rgb, bad = await asyncio.to_thread(decode, data)
        if bad is not None:
            return bad

        def work():
            predictor = pipelines.get(detector, tta)
            state = pipelines.tracker(session, predictor) if session is not None else None
            return analyse(predictor, rgb, distribution, crops, state)

        try:
            record = await asyncio.to_thread(pipelines.run, work)
        except Busy:
            return error(503, f"busy: {max_concurrent} requests already in flight; try again shortly")
        return {"file": name, **record}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(WEB, "index.html"))

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/api/health")
    def health():
        return {"status": "ok", "checkpoint": os.path.basename(checkpoint), "detector": detector,
                "max_upload_bytes": limit, "max_pixels": max_pixels, "max_concurrent": max_concurrent}

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

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # never a bare 500 page: one JSON line, and the server goes on
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    return app


def app_from_env():
    """The app uvicorn's worker processes build (--workers > 1): its settings come through the environment."""
    env = os.environ
    if env.get("SERVE_THREADS"):
        import torch

        torch.set_num_threads(int(env["SERVE_THREADS"]))
        cv2.setNumThreads(int(env["SERVE_THREADS"]))
    return create_app(env.get("SERVE_CHECKPOINT", config.RELEASED_MODEL), env.get("SERVE_DETECTOR", config.DETECTOR),
                      float(env.get("SERVE_MAX_UPLOAD_MB", 20)), int(env.get("SERVE_MAX_PIXELS", 40_000_000)),
                      int(env.get("SERVE_MAX_CONCURRENT", 4)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every interface")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the model (memory x N)")
    p.add_argument("--checkpoint", default=config.RELEASED_MODEL, help="the model to serve (a checkpoint of this project)")
    p.add_argument("--detector", default=config.DETECTOR, choices=sorted(DETECTORS), help="the face detector, unless a request names one")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (413 beyond)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest photo accepted, in pixels (413 beyond)")
    p.add_argument("--max-concurrent", type=int, default=4, help="requests in flight per process; beyond them a 503 at once")
    args = p.parse_args(argv)
    import uvicorn

    from models import CheckpointError, load_checkpoint
    from utils import fail

    try:
        load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        fail(str(e))
    os.environ.update(SERVE_CHECKPOINT=args.checkpoint, SERVE_DETECTOR=args.detector, SERVE_MAX_UPLOAD_MB=str(args.max_upload_mb),
                      SERVE_MAX_PIXELS=str(args.max_pixels), SERVE_MAX_CONCURRENT=str(args.max_concurrent))
    if args.workers > 1:  # each process builds its own app (and model) from the environment, on its share of the cores
        os.environ["SERVE_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
        uvicorn.run("serve:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers, log_level="warning")
    else:
        uvicorn.run(app_from_env(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
