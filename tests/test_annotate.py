"""annotate.py: a photo collection through Ray Data, locally and on a two-node cluster, through a killed actor
and a resumed run; every face row as demo.py --json gives it, every bad input a row with its reason."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

import config
from conftest import UTK, utk_rows

try:
    import ray  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("needs Ray Data (pip install 'ray[data]'), which is not installed", allow_module_level=True)

import annotate  # noqa: E402

PYTHON = [sys.executable, os.path.join(config.ROOT, "annotate.py")]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """40 real UTKFace and CLAP2016 photos in nested folders, a 3000x3000 one, a photo with no face and three
    broken files; demo.py --json's records for the same photos."""
    import demo

    root = tmp_path_factory.mktemp("collection")
    (root / "utk" / "deep").mkdir(parents=True)
    (root / "clap").mkdir()
    for k, r in enumerate(utk_rows("test", 30, seed=4)):
        shutil.copy(os.path.join(UTK, r["file"]), root / "utk" / ("deep" if k % 2 else ".") / os.path.basename(r["file"]))
    clap = os.path.join(config.SHARED_DATA, "clap2016")
    for name in sorted(os.listdir(os.path.join(clap, "images")))[:10]:
        shutil.copy(os.path.join(clap, "images", name), root / "clap" / name)
    astronaut = cv2.imread(os.path.join(config.ROOT, "images", "astronaut.jpg"))
    cv2.imwrite(str(root / "large.jpg"), cv2.resize(astronaut, (3000, 3000), interpolation=cv2.INTER_CUBIC))
    cv2.imwrite(str(root / "wall.jpg"), np.full((300, 400, 3), 140, np.uint8))
    data = (root / "large.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 4])
    (root / "text.jpg").write_text("not a photo")
    (root / "empty.png").write_bytes(b"")
    photos = annotate.list_inputs([str(root)])
    assert len(photos) == 45
    out = root.parent / (root.name + "_demo.json")
    demo.main(photos + ["--no-draw", "--json", str(out), "--workers", "1", "--device", "cpu"])
    return root, photos, {r["file"]: r for r in json.loads(out.read_text())}


def run_job(args, **kw):
    return subprocess.run(PYTHON + args + ["--quiet"], capture_output=True, text=True, timeout=600, **kw)


def rows_by_file(out):
    by = {}
    for r in annotate.read_dataset(str(out)).to_pylist():
        by.setdefault(r["file"], []).append(r)
    return by


def assert_matches_demo(out, photos, demo_records):
    """Every photo exactly once; its face rows demo.py's records (ages to 1e-4), a bad one a row with demo's reason."""
    by = rows_by_file(out)
    assert sorted(by) == sorted(photos)
    for path in photos:
        rows, record = sorted(by[path], key=lambda r: -1 if r["face"] is None else r["face"]), demo_records[path]
        if not record["faces"]:
            assert len(rows) == 1 and rows[0]["face"] is None and rows[0]["error"] == record["error"], (path, rows)
            continue
        assert [r["face"] for r in rows] == list(range(len(record["faces"])))
        for row, face in zip(rows, record["faces"]):
            assert row["error"] is None and row["photo_width"] > 0
            for key, value in face.items():
                if isinstance(value, float):
                    assert row[key] == pytest.approx(value, abs=1e-4), (path, key)
                else:
                    assert row[key] == value, (path, key)


def test_local_ray_gives_demos_records_and_an_audit(collection, tmp_path):
    root, photos, demo_records = collection
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(photos[:20]) + "\n")
    out = tmp_path / "job"
    done = run_job([str(listing), *photos[20:], "--out", str(out), "--num-cpus", "2", "--photos-per-part", "8"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_matches_demo(out, photos, demo_records)
    errors = {os.path.basename(r[0]["file"]): r[0]["error"] for r in rows_by_file(out).values() if r[0]["error"]}
    assert errors["wall.jpg"] == "no face found" and "not an image" in errors["text.jpg"]
    assert "empty" in errors["empty.png"] and "truncated" in errors["truncated.jpg"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["photos"] == 45 and summary["faces"] == sum(len(r["faces"]) for r in demo_records.values())
    assert summary["failures_by_reason"]["no face found"] >= 1 and (out / "summary.png").stat().st_size > 1000
    assert "| failure | photos |" in (out / "summary.md").read_text()
    again = run_job([str(listing), *photos[20:], "--out", str(out), "--num-cpus", "2"])  # a finished job: nothing to add
    assert again.returncode == 0 and "0 to do" in again.stdout and len(os.listdir(out / "parts")) == 6


@pytest.fixture
def two_node_cluster():
    """Two `ray start` nodes of one CPU each (bench.two_node_ray_cluster): as root, in a network namespace of
    their own whose only interface is the loopback, so every node is 127.0.0.1 and no traffic leaves it."""
    from bench import two_node_ray_cluster

    if os.geteuid() != 0 or not shutil.which("ip"):
        if os.environ.get("CI") == "true":
            raise AssertionError("the two-node test needs root and iproute2's `ip netns`")
        pytest.skip("needs root and iproute2's `ip netns` for a network namespace of its own")
    with two_node_ray_cluster() as cluster:
        assert cluster[1], "no network namespace could be made"
        yield cluster


def test_a_two_node_cluster_gives_the_same_rows(collection, two_node_cluster, tmp_path):
    root, photos, demo_records = collection
    address, inside, env = two_node_cluster
    out = tmp_path / "job"
    done = subprocess.run(inside + PYTHON + [str(root), "--out", str(out), "--address", address, "--photos-per-part", "16", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after Ray's start-up" in done.stdout
    assert_matches_demo(out, photos, demo_records)


def _start(args):
    return subprocess.Popen(PYTHON + args + ["--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_parts(out, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        parts = [p for p in os.listdir(out / "parts") if not p.startswith(".")] if (out / "parts").exists() else []
        if len(parts) >= n:
            return len(parts)
        time.sleep(0.2)
    raise AssertionError(f"{n} parts never appeared")


def test_a_network_actor_killed_mid_run_loses_nothing(collection, tmp_path):
    root, photos, demo_records = collection
    out = tmp_path / "job"
    proc = _start([str(root), "--out", str(out), "--num-cpus", "2", "--photos-per-part", "4", "--photos-per-batch", "2"])
    _wait_for_parts(out, 1, proc)
    found = subprocess.run(["pgrep", "-f", "ReadFaces"], capture_output=True, text=True).stdout.split()
    assert found and proc.poll() is None and not (out / "summary.json").exists()  # killed while the job runs
    os.kill(int(found[0]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert_matches_demo(out, photos, demo_records)


def test_a_stopped_run_resumes_with_only_the_rest(collection, tmp_path):
    root, photos, demo_records = collection
    out = tmp_path / "job"
    proc = _start([str(root), "--out", str(out), "--num-cpus", "2", "--photos-per-part", "4", "--photos-per-batch", "2"])
    _wait_for_parts(out, 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # as a crash or a reboot: nothing gets to clean up
    proc.wait(60)
    kept = len(set(annotate.done_files(str(out))))
    assert 4 <= kept < 45
    done = run_job([str(root), "--out", str(out), "--num-cpus", "2", "--photos-per-part", "4"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"45 photos listed, {kept} already annotated in {out}, {45 - kept} to do" in done.stdout
    assert f"annotated {45 - kept} photos" in done.stdout
    assert_matches_demo(out, photos, demo_records)


def test_inputs_from_folders_lists_and_tables(tmp_path):
    """A folder is searched recursively for photos; a text file lists paths, a CSV or Parquet file has a `path`
    column, relative paths from the list's own folder; anything else is a photo (missing: a failure row later)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.jpg", "a/b/two.PNG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# photos\na/one.jpg\n\n/elsewhere/three.jpg\n")
    (tmp_path / "table.csv").write_text("path,age\na/b/two.PNG,3\n")
    pq.write_table(pa.table({"path": ["a/one.jpg"], "other": [1]}), tmp_path / "table.parquet")
    (tmp_path / "bad.csv").write_text("file\nx.jpg\n")
    got = annotate.list_inputs([str(tmp_path / "a"), str(tmp_path / "list.txt"), str(tmp_path / "table.csv"),
                                str(tmp_path / "table.parquet"), str(tmp_path / "missing.jpg")])
    one, two = str(tmp_path / "a" / "one.jpg"), str(tmp_path / "a" / "b" / "two.PNG")
    assert got == [two, one, one, "/elsewhere/three.jpg", two, one, str(tmp_path / "missing.jpg")]
    with pytest.raises(SystemExit):
        annotate.list_inputs([str(tmp_path / "bad.csv")])
