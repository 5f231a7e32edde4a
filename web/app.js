// The page of serve.py: photos dropped or picked are posted to /api/analyze one at a time and drawn with
// their faces; the webcam posts one frame at a time to /api/track (the next frame only once the answer is
// in, so frames never queue up); results download as the same JSON and CSV as demo.py --json / --csv.
"use strict";

const CSV_COLUMNS = ["file", "frame", "face", "track", "x1", "y1", "x2", "y2", "score", "gender", "gender_prob",
                     "gender_unsure", "age", "age_std", "apparent_age", "apparent_age_std"];
const records = [];  // one per photo, as the API gave it (crops and distributions left out of the downloads)
const $ = (id) => document.getElementById(id);

function label(face) {
  const g = face.gender_unsure ? "?" : face.gender;
  return `${g} ${Math.round(face.age)} +-${Math.round(face.age_std)}`;
}

function colour(face) {
  return face.gender_unsure ? "#808080" : face.gender === "M" ? "#0080ff" : "#ff0050";
}

function drawFaces(ctx, faces, scale) {
  const size = Math.max(12, Math.round(14 * scale));
  ctx.lineWidth = Math.max(2, 2 * scale);
  ctx.font = `${size}px sans-serif`;
  for (const face of faces) {
    const shown = face.track_label ? { ...face, ...face.track_label } : face;
    const [x1, y1, x2, y2] = face.box;
    ctx.strokeStyle = ctx.fillStyle = colour(shown);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = label(shown);
    const w = ctx.measureText(text).width + 6;
    const ty = y1 - size - 6 > 0 ? y1 - size - 6 : y2 + 2;
    ctx.fillRect(x1, ty, w, size + 6);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + 3, ty + size);
  }
}

function showDetail(name, face) {
  $("detail").hidden = false;
  $("detail-title").textContent = `${name}: ${label(face)}`;
  $("detail-crop").src = face.crop || "";
  const gender = face.gender === "F" ? "female" : "male";
  $("detail-text").textContent = `${gender}, p = ${face.gender_prob.toFixed(2)}${face.gender_unsure ? " (unsure)" : ""}; ` +
    `age ${face.age.toFixed(1)} ± ${face.age_std.toFixed(1)}` +
    (face.apparent_age == null ? "" : `; looks ${face.apparent_age.toFixed(1)} ± ${face.apparent_age_std.toFixed(1)}`) +
    `; detector score ${face.score.toFixed(2)}`;
  const chart = $("detail-chart"), ctx = chart.getContext("2d");
  ctx.clearRect(0, 0, chart.width, chart.height);
  const p = face.age_distribution || [];
  const top = Math.max(...p, 1e-9), w = chart.width / 101, h = chart.height - 16;
  ctx.fillStyle = "#2f6fde";
  p.forEach((v, age) => ctx.fillRect(age * w, h - (v / top) * h, Math.max(1, w - 0.5), (v / top) * h));
  ctx.fillStyle = "#444";
  ctx.font = "10px sans-serif";
  for (const age of [0, 20, 40, 60, 80, 100]) ctx.fillText(String(age), Math.min(age * w, chart.width - 16), chart.height - 3);
}

function addPhoto(file, image, record) {
  const box = document.createElement("div");
  box.className = "photo";
  const canvas = document.createElement("canvas");
  canvas.width = record.width;
  canvas.height = record.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, record.width, record.height);
  drawFaces(ctx, record.faces, Math.max(record.width, record.height) / 800);
  const side = document.createElement("div");
  side.className = "side";
  const title = document.createElement("h3");
  title.textContent = `${file.name}: ${record.faces.length} face${record.faces.length === 1 ? "" : "s"}`;
  const list = document.createElement("ul");
  list.className = "faces";
  record.faces.forEach((face, k) => {
    const item = document.createElement("li");
    item.textContent = `${k + 1}. ${label(face)} (p ${face.gender_prob.toFixed(2)})`;
    item.dataset.face = k;
    item.addEventListener("click", () => showDetail(file.name, face));
    list.appendChild(item);
  });
  canvas.addEventListener("click", (ev) => {  // the face under the click, in the photo's pixels
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) * canvas.width / r.width, y = (ev.clientY - r.top) * canvas.height / r.height;
    const face = record.faces.find((f) => x >= f.box[0] && x <= f.box[2] && y >= f.box[1] && y <= f.box[3]);
    if (face) showDetail(file.name, face);
  });
  side.append(title, list);
  box.append(canvas, side);
  $("results").prepend(box);
}

function addError(name, message) {
  const p = document.createElement("p");
  p.className = "error";
  p.textContent = `${name}: ${message}`;
  $("results").prepend(p);
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = URL.createObjectURL(file);
  });
}

async function analyse(files) {
  const detector = $("detector").value;
  let done = 0;
  for (const file of files) {
    $("status").textContent = `analysing ${file.name} (${++done} of ${files.length})`;
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const res = await fetch(`/api/analyze?crops=true&distribution=true${detector ? "&detector=" + detector : ""}`,
                              { method: "POST", body: form });
      const body = await res.json();
      if (!res.ok) { addError(file.name, body.error || res.statusText); continue; }
      records.push(body);
      addPhoto(file, await loadImage(file).catch(() => null) || new Image(), body);
    } catch (e) {
      addError(file.name, e.message);
    }
  }
  $("status").textContent = `${records.length} photo(s) analysed`;
  $("download-json").disabled = $("download-csv").disabled = records.length === 0;
}

function plain(record) {  // the record as demo.py --json writes it
  return { file: record.file,
           faces: record.faces.map(({ crop, age_distribution, apparent_age_distribution, ...f }) => f) };
}

function download(name, text, type) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  a.click();
}

function csvText() {
  const quote = (v) => (/[",\n]/.test(String(v)) ? `"${String(v).replace(/"/g, '""')}"` : String(v));
  const rows = [CSV_COLUMNS.join(",")];
  for (const r of records) {
    r.faces.forEach((f, k) => {
      const [x1, y1, x2, y2] = f.box;
      const row = { file: r.file, frame: "", face: k, track: "", x1, y1, x2, y2, score: f.score, gender: f.gender,
                    gender_prob: f.gender_prob, gender_unsure: f.gender_unsure ? 1 : 0, age: f.age, age_std: f.age_std,
                    apparent_age: f.apparent_age ?? "", apparent_age_std: f.apparent_age_std ?? "" };
      rows.push(CSV_COLUMNS.map((c) => quote(row[c])).join(","));
    });
  }
  return rows.join("\n") + "\n";
}

// --- the webcam: one frame in flight at a time
let stream = null;
async function toggleWebcam() {
  if (stream) {
    stream.getTracks().forEach((t) => t.stop());
    stream = null;
    $("webcam").textContent = "Start webcam";
    $("live").hidden = true;
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  } catch (e) {
    $("status").textContent = `webcam: ${e.message}`;
    return;
  }
  const video = $("video"), canvas = $("live-canvas"), ctx = canvas.getContext("2d");
  const session = Math.random().toString(36).slice(2);
  video.srcObject = stream;
  $("live").hidden = false;
  $("webcam").textContent = "Stop webcam";
  const grab = document.createElement("canvas");
  let frames = 0, started = performance.now();
  while (stream) {
    if (video.readyState < 2) { await new Promise((r) => setTimeout(r, 50)); continue; }
    grab.width = canvas.width = video.videoWidth;
    grab.height = canvas.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((r) => grab.toBlob(r, "image/jpeg", 0.85));
    let body = { faces: [] };
    try {
      const res = await fetch(`/api/track?session=${session}`, { method: "POST", body: blob, headers: { "Content-Type": "image/jpeg" } });
      body = await res.json();
      if (!res.ok) { $("live-status").textContent = body.error; await new Promise((r) => setTimeout(r, 200)); continue; }
    } catch (e) {
      $("live-status").textContent = e.message;
      break;
    }
    ctx.drawImage(grab, 0, 0);
    drawFaces(ctx, body.faces, canvas.width / 800);
    frames += 1;
    $("live-status").textContent = `${(frames * 1000 / (performance.now() - started)).toFixed(1)} frames/s, ${body.faces.length} face(s)`;
  }
}

$("files").addEventListener("change", (e) => analyse([...e.target.files]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); analyse([...e.dataTransfer.files]); });
$("webcam").addEventListener("click", toggleWebcam);
$("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
$("download-json").addEventListener("click", () => download("faces.json", JSON.stringify(records.map(plain), null, 1), "application/json"));
$("download-csv").addEventListener("click", () => download("faces.csv", csvText(), "text/csv"));
