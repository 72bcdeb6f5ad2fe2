"use strict";
// The page talks to the JSON API of serving/webapp/app.py; no framework, no build step.

const state = { info: null, results: [], gradcam: false, scanId: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function bytes(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(0) + " kB";
  return n + " B";
}

async function api(url, options = {}) {
  let resp;
  try {
    resp = await fetch(url, options);
  } catch (err) {
    throw new Error("the server cannot be reached (" + err.message + ")");
  }
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) throw new Error((body && body.error) || `HTTP ${resp.status}`);
  return body;
}

function showError(container, message) {
  container.append(el("div", { class: "error", role: "alert", "data-testid": "error", text: message }));
}

// ------------------------------------------------------------------------------------------------ info

async function loadInfo() {
  try {
    const info = await api("/api/info");
    state.info = info;
    const m = info.model;
    const box = $("model-info");
    box.textContent = "";
    box.append("Model ", el("b", { text: m.name }));
    if (m.version) box.append(" · version ", el("b", { text: m.version, "data-testid": "model-version" }));
    if (m.alias) box.append(" · alias ", el("b", { text: m.alias }));
    box.append(" · " + m.source);
    if (!info.calibrated) box.append(" · ", el("span", { "data-testid": "uncalibrated", text: "uncalibrated confidences" }));
    if (info.card_url) {
      box.append(" · ", el("a", { href: info.card_url, target: "_blank", rel: "noopener", "data-testid": "card-link",
        text: "model card" }));
    }
    box.append(el("div", { class: "subtitle", "data-testid": "training-data", text: info.training_data.text }));
    box.title = m.uri;
    const notice = $("training-notice");
    notice.textContent = info.training_data.notice || "";
    notice.hidden = !info.training_data.notice;
    const lim = info.limits;
    $("limits").textContent = `TIFF, PNG or JPEG · up to ${lim.max_files} files at once, ${bytes(lim.max_upload_bytes)} ` +
      `and ${(lim.max_pixels / 1e6).toFixed(0)} megapixels each · ${info.review.text}`;
    for (const id of ["scan-class", "scan-reclass"]) {
      const sel = $(id);
      sel.textContent = "";
      for (const c of info.classes) sel.append(el("option", { value: c, text: c.replaceAll("_", " ") }));
    }
    $("scan-tile").value = info.tile.size;
    $("scan-stride").value = info.tile.stride;
  } catch (err) {
    $("model-info").textContent = "model unavailable: " + err.message;
  }
}

// ------------------------------------------------------------------------------------------------ classify

function bars(top) {
  const box = el("div", { class: "bars", "data-testid": "bars" });
  for (const t of top) {
    const pct = Math.max(0, Math.min(100, t.p * 100));
    const fill = el("div", { class: "bar-fill" });
    fill.style.width = pct.toFixed(1) + "%";
    box.append(el("div", { class: "bar-row", "data-testid": "bar" }, [
      el("span", { class: "bar-name", title: t.class, text: t.class.replaceAll("_", " ") }),
      el("div", { class: "bar-track" }, [fill]),
      el("span", { class: "bar-value", text: pct.toFixed(1) + " %" }),
    ]));
  }
  return box;
}

// The pixel size a scale-aware model used, and where it came from (the answer's pixel_size; null: no scale input).
const PIXEL_SOURCES = {
  request: "given with the request", tags: "from the TIFF tags", databar_scalebar: "from the data bar's scale bar",
  databar_mag: "from the data bar's magnification / field width", unknown: "unknown",
};

function nm(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "?";
  return value >= 1000 ? `${(value / 1000).toPrecision(3)} µm` : `${Number(value).toPrecision(3)} nm`;
}

function pixelSizeText(p) {
  const where = PIXEL_SOURCES[p.pixel_size_source] || p.pixel_size_source;
  if (p.pixel_size_source === "unknown" || p.model_pixel_size_nm === null) {
    return `Pixel size unknown${p.reason ? ` (${p.reason})` : ""}: classified without it`;
  }
  return `Pixel size ${nm(p.pixel_size_nm)} ${where}; ${nm(p.model_pixel_size_nm)} at the model's input`;
}

function pixelSizeLine(p) {
  return el("div", { class: "pixel-size", "data-testid": "pixel-size", "data-source": p.pixel_size_source,
    text: pixelSizeText(p) });
}

function pendingCard(file) {
  return el("div", { class: "card pending" }, [
    el("div", { class: "card-body" }, [
      el("div", { class: "filename", text: file.name }),
      el("div", {}, [el("span", { class: "spinner" }), "classifying…"]),
    ]),
  ]);
}

function resultCard(r) {
  const img = el("img", { src: r.preview, alt: r.filename, "data-testid": "thumb" });
  img.dataset.preview = r.preview;
  const badge = el("span", { class: "badge", text: `${r.format} ${r.width}×${r.height}` });
  const body = el("div", { class: "card-body" }, [
    el("div", { class: "filename", title: r.filename, text: r.filename }),
    el("div", { class: "label", "data-testid": "label", text: r.label.replaceAll("_", " ") }),
  ]);
  if (r.unfamiliar) {
    body.append(el("div", { class: "flag unfamiliar", "data-testid": "unfamiliar",
      text: "Unfamiliar image: unlike what the model was trained on" }));
  }
  if (r.needs_review) {
    body.append(el("div", { class: "flag", "data-testid": "needs-review",
      text: `Check this one (${(r.confidence * 100).toFixed(0)} %)` }));
    body.append(el("div", { class: "review-reason", "data-testid": "review-reason", text: r.review_reason }));
  }
  body.append(bars(r.top));
  if (r.pixel_size) body.append(pixelSizeLine(r.pixel_size));
  body.append(correctionBox(r));
  const card = el("div", { class: "card" + (r.needs_review ? " low" : ""), "data-testid": "result" },
    [el("div", { class: "thumb" }, [img, badge]), body]);
  card.dataset.id = r.id;
  return card;
}

// ------------------------------------------------------------------------------------------------ corrections

function savedName() {
  try { return localStorage.getItem("emassist-who") || ""; } catch (_) { return ""; }
}

function correctedNote(label, text) {
  return el("div", { class: "corrected", "data-testid": "corrected",
    text: text || `corrected to ${label.replaceAll("_", " ")}` });
}

// "Wrong? choose the right class": the upload's original bytes are stored under that class (POST /api/correct).
function correctionBox(r) {
  const box = el("div", { class: "correct" });
  if (r.corrected) { box.append(correctedNote(r.corrected)); return box; }
  const classes = state.info ? state.info.classes : Object.keys(r.probabilities);
  const select = el("select", { "data-testid": "correct-class", "aria-label": "the right class" });
  for (const c of classes) select.append(el("option", { value: c, text: c.replaceAll("_", " ") }));
  if (r.top.length > 1) select.value = r.top[1].class;  // the runner-up: the likeliest right answer
  const who = el("input", { type: "text", maxlength: "128", placeholder: "your name", "data-testid": "correct-who",
    "aria-label": "your name" });
  who.value = savedName();
  const send = el("button", { type: "button", class: "button small", "data-testid": "correct-send", text: "Correct" });
  const status = el("div", { class: "correct-status", "data-testid": "correct-status", role: "status" });
  const details = el("details", { class: "correct-form" }, [
    el("summary", { "data-testid": "correct-open", text: "Wrong? choose the right class" }),
    el("div", { class: "correct-row" }, [select, who, send]), status,
  ]);
  send.addEventListener("click", async () => {
    status.textContent = "";
    status.classList.remove("error");
    send.disabled = true;
    try { localStorage.setItem("emassist-who", who.value.trim()); } catch (_) { /* private mode */ }
    try {
      const c = await api("/api/correct", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ id: r.id, label: select.value, who: who.value.trim() }) });
      if (c.status === "conflicting") {
        status.textContent = c.message;
        send.disabled = false;
        return;
      }
      r.corrected = c.label;
      details.replaceWith(correctedNote(c.label, c.status === "repeat" ?
        `corrected to ${c.label.replaceAll("_", " ")} (already stored)` : ""));
    } catch (err) {
      status.textContent = err.message;
      status.classList.add("error");
      send.disabled = false;
    }
  });
  box.append(details);
  return box;
}

async function showGradcam(card, on) {
  const img = card.querySelector("img");
  if (!img) return;
  if (!on) { img.src = img.dataset.preview; img.dataset.mode = "preview"; return; }
  if (!img.dataset.gradcam) {
    try {
      const g = await api(`/api/gradcam/${card.dataset.id}`);
      img.dataset.gradcam = g.overlay;
      img.title = `Grad-CAM for ${g.class} (layer ${g.layer})`;
    } catch (err) {
      showError($("errors"), `Grad-CAM: ${err.message}`);
      return;
    }
  }
  if (state.gradcam) { img.src = img.dataset.gradcam; img.dataset.mode = "gradcam"; }
}

function updateBatch() {
  const n = state.results.length;
  const low = state.results.filter((r) => r.needs_review).length;
  $("batch-summary").textContent = n ? `${n} image${n > 1 ? "s" : ""}` + (low ? `, ${low} to check` : "") : "";
  const link = $("download-csv");
  link.classList.toggle("disabled", n === 0);
  link.href = "/api/results.csv?ids=" + state.results.map((r) => r.id).join(",");
}

async function classifyFiles(files) {
  const errors = $("errors");
  errors.textContent = "";
  const info = state.info;
  let list = Array.from(files);
  if (info && list.length > info.limits.max_files) {
    showError(errors, `${list.length} files chosen; at most ${info.limits.max_files} at once. The first ` +
      `${info.limits.max_files} are classified.`);
    list = list.slice(0, info.limits.max_files);
  }
  for (const file of list) {
    if (info && file.size > info.limits.max_upload_bytes) {
      showError(errors, `${file.name}: file too large (${bytes(file.size)}; the limit is ${bytes(info.limits.max_upload_bytes)})`);
      continue;
    }
    const placeholder = pendingCard(file);
    $("results").prepend(placeholder);
    try {
      const r = await api("/api/classify?filename=" + encodeURIComponent(file.name),
        { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
      state.results.push(r);
      const card = resultCard(r);
      placeholder.replaceWith(card);
      if (state.gradcam) showGradcam(card, true);
    } catch (err) {
      placeholder.remove();
      showError(errors, err.message.startsWith(file.name) ? err.message : `${file.name}: ${err.message}`);
    }
    updateBatch();
  }
}

function setupClassify() {
  const zone = $("dropzone");
  $("file-input").addEventListener("change", (e) => { classifyFiles(e.target.files); e.target.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) classifyFiles(e.dataTransfer.files);
  });
  $("toggle-gradcam").addEventListener("change", (e) => {
    state.gradcam = e.target.checked;
    for (const card of document.querySelectorAll("#results .card[data-id]")) showGradcam(card, state.gradcam);
  });
  $("clear").addEventListener("click", () => {
    state.results = [];
    $("results").textContent = "";
    $("errors").textContent = "";
    updateBatch();
  });
}

// ------------------------------------------------------------------------------------------------ tile scan

function showScan(s) {
  state.scanId = s.id;
  $("scan-result").classList.remove("hidden");
  const img = $("scan-heatmap");
  img.src = s.heatmap;
  img.dataset.cls = s.class;
  $("scan-reclass").value = s.class;
  $("scan-caption").textContent = `Heat = mean ${s.class.replaceAll("_", " ")} score of the tiles covering each ` +
    `pixel (dark: low, bright: high). Peak ${(s.max * 100).toFixed(0)} % at x=${s.peak.x}, y=${s.peak.y}.`;
  $("scan-meta").textContent = `${s.filename}: ${s.n_tiles} tiles (${s.cols}×${s.rows}) of ${s.tile} px every ` +
    `${s.stride} px over ${s.width}×${s.height} px` + (s.databar_rows ? ` (data bar of ${s.databar_rows} rows cropped)` : "") +
    ` in ${s.seconds.toFixed(1)} s.` + (s.pixel_size ? ` ${pixelSizeText(s.pixel_size)} (each tile).` : "");
  $("scan-csv").href = `/api/scan/${s.id}/tiles.csv`;
  $("scan-result").dataset.grid = JSON.stringify(s.grid);
}

function setupScan() {
  $("scan-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const errors = $("scan-error");
    errors.textContent = "";
    const file = $("scan-file").files[0];
    if (!file) { showError(errors, "Choose an image to scan first."); return; }
    const params = new URLSearchParams({ filename: file.name, class: $("scan-class").value,
      tile: $("scan-tile").value, stride: $("scan-stride").value });
    const button = $("scan-run");
    button.disabled = true;
    button.textContent = "Scanning…";
    try {
      showScan(await api("/api/scan?" + params, { method: "POST", body: file,
        headers: { "Content-Type": "application/octet-stream" } }));
    } catch (err) {
      showError(errors, err.message);
    } finally {
      button.disabled = false;
      button.textContent = "Scan";
    }
  });
  $("scan-reclass").addEventListener("change", async (e) => {
    if (!state.scanId) return;
    try {
      showScan(await api(`/api/scan/${state.scanId}/heatmap?class=` + encodeURIComponent(e.target.value)));
    } catch (err) {
      showError($("scan-error"), err.message);
    }
  });
}

// ------------------------------------------------------------------------------------------------ live

const LIVE_MAX = 200; // arrivals shown (newest first)

function liveCard(ev) {
  const alert = ev.alert ? " alert" : "";
  const card = el("div", { class: "live-item" + alert + (ev.status !== "classified" ? " bad" : ""),
    "data-testid": "live-item", "data-relpath": ev.relpath || "" });
  if (ev.thumbnail) card.append(el("img", { class: "live-thumb", src: ev.thumbnail, alt: "what the model saw" }));
  else card.append(el("div", { class: "live-thumb empty", text: "—" }));
  const body = el("div", { class: "live-body" });
  body.append(el("div", { class: "filename", text: ev.relpath || ev.path || "" }));
  if (ev.status === "classified") {
    const line = el("div", { class: "live-label" });
    line.append(el("b", { "data-testid": "live-label", text: ev.label.replaceAll("_", " ") }),
      " " + (100 * ev.confidence).toFixed(1) + " %");
    if (ev.alert) line.append(" ", el("span", { class: "badge alert-badge", "data-testid": "live-alert", text: "ALERT" }));
    if (ev.needs_review) {
      line.append(" ", el("span", { class: "badge review", "data-testid": "live-review",
        text: "check by eye" + (ev.review_reason ? ": " + ev.review_reason : "") }));
    }
    body.append(line);
  } else {
    body.append(el("div", { class: "live-error", text: ev.status + ": " + (ev.error || "") }));
  }
  body.append(el("div", { class: "muted small", text: ev.time || "" }));
  card.append(body);
  return card;
}

function addLive(ev) {
  const list = $("live-list");
  list.prepend(liveCard(ev));
  while (list.children.length > LIVE_MAX) list.lastChild.remove();
}

async function setupLive() {
  let info;
  try {
    info = await api("/api/live");
  } catch (err) {
    $("live-status").textContent = "live view unavailable: " + err.message;
    return;
  }
  if (!info.watching) {
    $("live-status").textContent = "No folder is watched. Start the page with `emassist web --watch DIR` to see " +
      "images here as the microscope saves them.";
    return;
  }
  $("live-status").textContent = `Watching ${info.watching} · results in ${info.out} · newest first`;
  const source = new EventSource("/api/live/events");
  source.addEventListener("arrival", (e) => addLive(JSON.parse(e.data)));
  source.onerror = () => { $("live-status").dataset.connection = "reconnecting"; };
  source.onopen = () => { $("live-status").dataset.connection = "open"; };
}

// ------------------------------------------------------------------------------------------------ tabs

function setupTabs() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".tab")) {
        t.classList.toggle("active", t === tab);
        $(t.dataset.panel).classList.toggle("hidden", t !== tab);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------------ start-up

// The server answers before its model is loaded: /api/health says "loading" (503) until it is "ok" (200), or
// "error" with the reason. Until then the page says so; the model's info and the Live tab follow when it is ready.
const HEALTH_POLL_MS = 500;

async function waitForModel() {
  const status = $("model-status");
  for (;;) {
    let body = null;
    try {
      const resp = await fetch("/api/health", { cache: "no-store" });
      body = await resp.json();
    } catch (err) {
      body = { status: "unreachable", error: "the server cannot be reached (" + err.message + ")" };
    }
    if (body.status === "ok") {
      status.hidden = true;
      status.dataset.state = "ok";
      return true;
    }
    if (body.status === "error") {
      const text = "The model could not be loaded: " + body.error;
      status.textContent = text;
      status.dataset.state = "error";
      status.classList.replace("loading", "load-error");
      status.setAttribute("role", "alert");
      $("model-info").textContent = "model unavailable";
      $("live-status").textContent = "live view unavailable: the model could not be loaded";
      return false;
    }
    const waited = body.seconds === undefined ? "" : ` (${Math.round(body.seconds)} s)`;
    status.textContent = body.status === "loading"
      ? `loading the model…${waited} The page is ready to use as soon as it is loaded.`
      : `waiting for the server… ${body.error || ""}`;
    status.dataset.state = body.status;
    $("model-info").textContent = "loading the model…";
    await new Promise((resolve) => setTimeout(resolve, HEALTH_POLL_MS));
  }
}

async function start() {
  if (await waitForModel()) {
    await loadInfo();
    setupLive();
  }
}

setupTabs();
setupClassify();
setupScan();
start();
