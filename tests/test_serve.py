"""serve.py: the REST API gives the predictor's records, refuses bad input with a 4xx JSON error and keeps
serving, enforces its limits (413; 503 past its queue), batches requests without changing any answer, counts
them in /metrics, and the page works in a real browser (headless Chromium)."""
import io
import os
import shutil
import socket
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

import config
import serve
from predictor import AgeGenderPredictor

IMAGES = os.path.join(config.ROOT, "images")


PHOTOS = ["astronaut.jpg", "grace_hopper.jpg", "collage.jpg"]


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    with TestClient(serve.create_app()) as c:
        yield c


def _bytes(name):
    with open(os.path.join(IMAGES, name), "rb") as f:
        return f.read()


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """serve's app under a real uvicorn on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class SlowPipelines:
    """A stand-in for serve.Pipelines: every batch takes `seconds` and finds no face; it records the
    size of each batch it is given."""

    detector = "yunet"

    def __init__(self, seconds):
        self.seconds, self.batches = seconds, []
        self.gate = threading.Event()  # cleared by a test: every batch waits until it is set again
        self.gate.set()

    def find_faces(self, key, photo):
        return [], []

    def run_batch(self, key, requests):
        self.batches.append(len(requests))
        self.gate.wait(60)
        time.sleep(self.seconds)
        return [{"faces": [], "width": int(r[0].size[0]), "height": int(r[0].size[1])} for r in requests]


def _post_all(url, bodies, timeout=60):
    """POST every body at once, one thread each; the responses in order."""
    import httpx

    out = [None] * len(bodies)

    def post(i):
        out[i] = httpx.post(url + "/api/analyze", content=bodies[i], timeout=timeout)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, out


def _metric(text, name, **labels):
    """The value of one sample in Prometheus' text format."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name), shutil.which("chromedriver")
    return None, None


def test_api_gives_the_predictors_records(client):
    predictor = AgeGenderPredictor(device="cpu")
    for name in PHOTOS:
        want = [f.to_dict() for f in predictor(os.path.join(IMAGES, name))]
        assert want
        multipart = client.post("/api/analyze", files={"file": (name, _bytes(name), "image/jpeg")})
        raw = client.post("/api/analyze", content=_bytes(name), headers={"Content-Type": "image/jpeg"})
        for r in (multipart, raw):
            assert r.status_code == 200
            assert r.json()["faces"] == want
        assert multipart.json()["file"] == name and raw.json()["file"] == "upload"
    r = client.post("/api/analyze?distribution=true&crops=true", content=_bytes("astronaut.jpg"))
    face = r.json()["faces"][0]
    assert len(face["age_distribution"]) == config.NUM_AGES and abs(sum(face["age_distribution"]) - 1) < 1e-3
    crop = cv2.imdecode(np.frombuffer(__import__("base64").b64decode(face["crop"].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape == (config.IMAGE_H, config.IMAGE_W, 3)
    assert client.get("/api/health").json()["status"] == "ok"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/analyze", "/api/track", "/api/health"}


def test_api_and_webcam_labels_give_a_two_age_models_apparent_age(two_age_release):
    from fastapi.testclient import TestClient

    with TestClient(serve.create_app(checkpoint=two_age_release)) as c:
        (face,) = c.post("/api/analyze?distribution=true", content=_bytes("astronaut.jpg")).json()["faces"]
        assert 3 < face["apparent_age"] - face["age"] < 7 and len(face["apparent_age_distribution"]) == config.NUM_AGES
        (tracked,) = c.post("/api/track?session=s", content=_bytes("astronaut.jpg")).json()["faces"]
        label = tracked["track_label"]
        assert label["apparent_age"] == pytest.approx(tracked["apparent_age"], abs=0.2) and "apparent_age_distribution" not in tracked


def test_webcam_frames_keep_one_track(client):
    tracks = []
    for _ in range(3):
        r = client.post("/api/track?session=t1", content=_bytes("astronaut.jpg"))
        assert r.status_code == 200
        (face,) = r.json()["faces"]
        tracks.append(face["track"])
        assert face["track_label"]["gender"] == face["gender"] and "age_distribution" not in face
    assert tracks == [0, 0, 0]
    assert client.post("/api/track?session=t2", content=_bytes("astronaut.jpg")).json()["faces"][0]["track"] == 0


def test_bad_input_gets_a_4xx_json_error_and_the_server_goes_on(client):
    photo = _bytes("astronaut.jpg")
    corpus = {
        "empty": (b"", 400, "empty"),
        "text": (b"hello, not a picture", 400, "not an image"),
        "truncated": (photo[: len(photo) // 3], 400, "truncated"),
        "html": (b"<html><body>hi</body></html>", 400, "not an image"),
    }
    for name, (body, status, words) in corpus.items():
        for r in (client.post("/api/analyze", content=body),
                  client.post("/api/analyze", files={"file": (name, body, "application/octet-stream")})):
            assert r.status_code == status and words in r.json()["error"], (name, r.status_code, r.text)
    r = client.post("/api/analyze", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    r = client.post("/api/analyze", files={"other": ("a.jpg", photo, "image/jpeg")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = client.post("/api/analyze?detector=../../etc/passwd", content=photo)
    assert r.status_code == 400 and "unknown detector" in r.json()["error"]
    r = client.post("/api/track", content=photo)  # no session
    assert r.status_code == 422
    # no face: a 200 with an empty list; grayscale, alpha and 16-bit photos are read
    wall = client.post("/api/analyze", content=_png(np.full((300, 300, 3), 90, np.uint8)))
    assert wall.status_code == 200 and wall.json()["faces"] == []
    rgb = np.asarray(Image.open(os.path.join(IMAGES, "astronaut.jpg")).convert("RGB"))
    for variant in (rgb.mean(2).astype(np.uint8), np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
                    (rgb.mean(2) * 257).astype(np.uint16)):
        r = client.post("/api/analyze", content=_png(variant))
        assert r.status_code == 200 and len(r.json()["faces"]) == 1
    assert client.get("/api/health").status_code == 200
    assert client.post("/api/analyze", content=photo).json()["faces"][0]["gender"] in ("F", "M")


def test_size_and_pixel_limits_answer_413():
    from fastapi.testclient import TestClient

    with TestClient(serve.create_app(max_upload_mb=0.01, max_pixels=100_000)) as c:
        big = c.post("/api/analyze", content=_bytes("collage.jpg"))  # 40 KB > 10 KB
        assert big.status_code == 413 and "too large" in big.json()["error"]
        ok, small_jpg = cv2.imencode(".jpg", np.full((400, 400, 3), 128, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 30])
        assert len(small_jpg) < 10_000
        r = c.post("/api/analyze", content=small_jpg.tobytes())  # 160,000 pixels > 100,000
        assert r.status_code == 413 and "pixels" in r.json()["error"]
        assert c.get("/api/health").status_code == 200


def test_past_the_queue_a_503_with_retry_after_and_health_answers_meanwhile():
    """8 requests at once on a queue of 2 whose batches are held back: the 5 past the queue get a 503 at once,
    and health answers while the rest wait, before any of them finishes (behaviour, not a clock)."""
    import httpx

    fake = SlowPipelines(0.0)
    fake.gate.clear()
    with Server(serve.create_app(queue_size=2, max_batch=1, max_wait_ms=0, pipelines=fake)) as server:
        threads, answers = _post_all(server.url, [_bytes("astronaut.jpg")] * 8)
        for _ in range(6000):  # the refusals come back while the gate is shut (60 s at most)
            if sum(a is not None for a in answers) >= 5:
                break
            time.sleep(0.01)
        health = httpx.get(server.url + "/api/health", timeout=30)
        assert health.status_code == 200 and health.json()["queue_depth"] >= 2
        assert all(a is None or a.status_code == 503 for a in answers)  # no accepted request has finished yet
        fake.gate.set()
        for t in threads:
            t.join()
        codes = [r.status_code for r in answers]
        assert set(codes) == {200, 503}, codes
        assert codes.count(200) >= 3  # the one running and the two that waited
        for r in answers:
            if r.status_code == 503:
                assert "busy" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        assert max(fake.batches) == 1
        assert httpx.post(server.url + "/api/analyze", content=_bytes("astronaut.jpg"), timeout=30).status_code == 200


def test_a_request_that_waits_past_the_queue_timeout_gets_a_503():
    fake = SlowPipelines(1.0)
    with Server(serve.create_app(queue_size=10, queue_timeout=0.3, max_batch=1, max_wait_ms=0, pipelines=fake)) as server:
        threads, answers = _post_all(server.url, [_bytes("astronaut.jpg")] * 3)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in answers)
        assert codes == [200, 503, 503], codes
        assert all("waited" in r.json()["error"] and "retry-after" in r.headers for r in answers if r.status_code == 503)
        assert fake.batches == [1]  # the two that timed out were never run


def test_photos_batched_together_get_what_each_gets_alone():
    import httpx

    predictor = AgeGenderPredictor(device="cpu")
    photos = PHOTOS + ["astronaut.jpg"]
    want = [[f.to_dict() for f in predictor(os.path.join(IMAGES, name))] for name in photos]
    app = serve.create_app(max_wait_ms=300)  # a long wait: the four requests join one batch
    with Server(app) as server:
        assert httpx.post(server.url + "/api/analyze", content=_bytes("astronaut.jpg"), timeout=60).status_code == 200  # warm
        threads, answers = _post_all(server.url, [_bytes(name) for name in photos])
        for t in threads:
            t.join()
        assert [r.json()["faces"] for r in answers] == want
        metrics = httpx.get(server.url + "/metrics").text
    photos_in_batches = _metric(metrics, "batch_photos_sum")
    batches = _metric(metrics, "batch_photos_count")
    assert photos_in_batches == 1 + len(photos) and batches < photos_in_batches  # at least one batch of several photos


def test_metrics_count_known_requests_and_every_request_is_logged(caplog):
    from fastapi.testclient import TestClient

    with TestClient(serve.create_app()) as c, caplog.at_level("INFO", logger="serve"):
        for name in ("astronaut.jpg", "collage.jpg"):
            assert c.post("/api/analyze", content=_bytes(name)).status_code == 200
        assert c.post("/api/analyze", content=b"not a photo").status_code == 400
        assert c.get("/api/health").status_code == 200
        text = c.get("/metrics").text
    assert _metric(text, "http_requests_total", route="/api/analyze", status="200") == 2
    assert _metric(text, "http_requests_total", route="/api/analyze", status="400") == 1
    assert _metric(text, "http_request_duration_seconds_count", route="/api/analyze") == 3
    assert _metric(text, "faces_found_total") == 4  # the astronaut and the collage's three
    assert _metric(text, "queue_depth") == 0
    assert _metric(text, "batch_faces_sum") == 4
    lines = [r.getMessage() for r in caplog.records if r.name == "serve"]
    assert sum(line.startswith("POST /api/analyze 200 ") and line.endswith(" ms") for line in lines) == 2
    assert any(line.startswith("POST /api/analyze 400 ") for line in lines)


def test_bad_photos_among_good_ones_at_once_get_4xx_and_the_good_ones_200():
    photo = _bytes("astronaut.jpg")
    bad = [b"", b"hello, not a picture", photo[: len(photo) // 3], b"<html></html>"]
    with Server(serve.create_app(max_wait_ms=50)) as server:
        bodies = [photo, *bad, _bytes("grace_hopper.jpg"), photo]
        threads, answers = _post_all(server.url, bodies)
        for t in threads:
            t.join()
    for body, r in zip(bodies, answers):
        if body in bad:
            assert r.status_code == 400 and r.json()["error"], r.text
        else:
            assert r.status_code == 200 and len(r.json()["faces"]) == 1


def test_on_shutdown_the_requests_in_flight_finish():
    """What SIGTERM does to uvicorn (it sets should_exit): stop listening, let the requests in flight finish."""
    fake = SlowPipelines(1.0)
    server = Server(serve.create_app(max_batch=1, max_wait_ms=0, pipelines=fake))
    with server:
        threads, answers = _post_all(server.url, [_bytes("astronaut.jpg")] * 2)
        time.sleep(0.4)
        server.server.should_exit = True
        for t in threads:
            t.join()
    assert [r.status_code for r in answers] == [200, 200]


def test_the_page_in_a_real_browser(tmp_path, two_age_release):
    browser, driver_path = _chromium()
    if not browser or not driver_path:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium and chromium-driver (.ci/run); they are missing")
        pytest.skip("no chromium / chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    with Server(serve.create_app(checkpoint=two_age_release)) as server:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get(server.url + "/")
            assert "Age and gender" in driver.title
            driver.find_element(By.ID, "files").send_keys(os.path.join(IMAGES, "collage.jpg"))
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".faces li")) >= 3)
            items = [li.text for li in driver.find_elements(By.CSS_SELECTOR, ".faces li")]
            assert len(items) == 3 and all(any(g + " " in t for g in ("F", "M", "?")) and "+-" in t for t in items), items
            canvas = driver.find_element(By.CSS_SELECTOR, ".photo canvas")
            assert canvas.get_property("width") == 1100  # drawn at the photo's size, scaled by CSS
            driver.find_elements(By.CSS_SELECTOR, ".faces li")[0].click()
            WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "detail").is_displayed())
            assert driver.find_element(By.ID, "detail-crop").get_attribute("src").startswith("data:image/png")
            assert "; looks " in driver.find_element(By.ID, "detail-text").text  # the apparent age beside the age
            assert not driver.find_element(By.ID, "download-json").get_property("disabled")
            # what the page drew: the boxes' colours are on the canvas
            png = driver.get_screenshot_as_png()
            shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            drawn = ((shot[..., 2] > 200) & (shot[..., 1] < 60) & (shot[..., 0] > 40)).sum()  # the women's #ff0050
            assert drawn > 500
            path = os.environ.get("WEB_SCREENSHOT") or str(tmp_path / "page.png")
            with open(path, "wb") as f:
                f.write(png)
        finally:
            driver.quit()


def test_sigterm_lets_the_requests_in_flight_finish(tmp_path):
    """python serve.py as a user runs it: SIGTERM while requests are in flight; each still gets its 200, and
    the server exits cleanly."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, os.path.join(config.ROOT, "serve.py"), "--port", str(port), "--max-wait-ms", "0",
                               "--max-batch", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        serve.wait_until_healthy(url, 30)
        threads, answers = _post_all(url, [_bytes("collage.jpg")] * 6)
        while not any(answers):  # one answered: the others are waiting or being read
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        out, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert [r.status_code for r in answers] == [200] * 6 and all(len(r.json()["faces"]) == 3 for r in answers)
    # uvicorn raises the signal again once it has shut down, so that a process manager sees what stopped it
    assert server.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Traceback" not in err
    assert err.count("POST /api/analyze 200") == 6  # the access log: one line per request


def test_waiting_for_a_server_that_never_answers_ends_with_a_reason():
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RuntimeError, match="no answer from /api/health"):
        serve.wait_until_healthy(url, 0.5)
