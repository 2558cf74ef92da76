// The Inferoxy dashboard: polls GET /dashboard/state and draws it. No framework, no build step, no CDN.
// Every value from the server goes into the page as text (textContent), never as HTML: model names,
// replica ids and reasons come from specs and logs.
"use strict";

const STATE_URL = "/dashboard/state";
const POLL_MS = 1500;
const HISTORY = 120; // points of the request rate sparkline: 3 minutes at POLL_MS
const KEY = "inferoxy.dashboard.key"; // sessionStorage: the key lives as long as the tab

const rates = [];
let timer = null;

function $(id) { return document.getElementById(id); }

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function stateBadge(row, state) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "state state-" + state;
  span.textContent = state;
  td.appendChild(span);
  row.appendChild(td);
  return td;
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 0.001) return (value * 1e6).toFixed(0) + " µs";
  if (value < 1) return (value * 1e3).toFixed(value < 0.01 ? 2 : 1) + " ms";
  return value.toFixed(2) + " s";
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " m " + Math.floor(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function number(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function replaceRows(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

function drawModels(models) {
  const rows = models.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.model = m.name + "/" + m.version;
    cell(tr, m.name, "name");
    cell(tr, m.version + (m.default ? " (default)" : ""));
    const state = stateBadge(tr, m.state);
    if (m.reason) state.title = m.reason;
    cell(tr, m.ready_replicas + " / " + (m.desired_replicas === null ? "?" : m.desired_replicas), "num replicas");
    cell(tr, m.queue_depth, "num queue");
    cell(tr, m.batches_in_flight, "num");
    cell(tr, m.requests, "num requests");
    cell(tr, m.errors, "num errors");
    cell(tr, number(m.request_rate, 1), "num rate");
    cell(tr, seconds(m.latency_p50_s), "num");
    cell(tr, seconds(m.latency_p99_s), "num");
    cell(tr, number(m.batch_size_mean, 1), "num");
    // The spec's description (whole in the tooltip) and framework; textContent, so a spec cannot inject markup.
    const about = [m.framework, m.description].filter(Boolean).join(": ");
    cell(tr, about || "–", about ? "description" : "description muted").title = about;
    return tr;
  });
  replaceRows($("models"), rows);
}

function drawReplicas(models) {
  const rows = [];
  for (const m of models) {
    for (const r of m.replicas) {
      const tr = document.createElement("tr");
      tr.dataset.replica = r.id;
      cell(tr, m.name + "/" + m.version);
      cell(tr, r.id);
      stateBadge(tr, r.state);
      cell(tr, r.gpu === null ? "CPU" : "GPU " + r.gpu);
      cell(tr, r.pid === null ? "–" : r.pid, "num");
      cell(tr, duration(r.uptime_s), "num");
      cell(tr, m.restarts, "num");
      rows.push(tr);
    }
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(tr, "no replica is running", "muted");
    td.colSpan = 7;
    rows.push(tr);
  }
  replaceRows($("replicas"), rows);
}

function drawSparkline(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 4;
  ctx.clearRect(0, 0, w, h);
  const top = Math.max(1, ...points);
  ctx.fillStyle = "#6b7385";
  ctx.font = "11px sans-serif";
  ctx.fillText(top.toFixed(1) + "/s", 6, 12);
  if (points.length < 2) return;
  const step = (w - 2 * pad) / (HISTORY - 1);
  const x0 = w - pad - (points.length - 1) * step;
  const y = (v) => h - pad - (v / top) * (h - 2 * pad - 12);
  ctx.beginPath();
  ctx.moveTo(x0, h - pad);
  points.forEach((v, i) => ctx.lineTo(x0 + i * step, y(v)));
  ctx.lineTo(x0 + (points.length - 1) * step, h - pad);
  ctx.closePath();
  ctx.fillStyle = "rgba(43, 95, 171, 0.18)";
  ctx.fill();
  ctx.beginPath();
  points.forEach((v, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x0 + i * step, y(v)));
  ctx.strokeStyle = "#2b5fab";
  ctx.lineWidth = 2;
  ctx.stroke();
}

function draw(state) {
  const models = state.models;
  const ready = models.filter((m) => m.state === "ready").length;
  const t = state.totals;
  $("summary").textContent = models.length + " model versions, " + ready + " ready · " + t.requests +
    " requests, " + t.errors + " errors · " + number(t.request_rate, 1) + " req/s";
  $("updated").textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString();
  $("window").textContent = state.window_s === null ? "– (the first sample)" : state.window_s.toFixed(1) + " s";
  const problems = $("problems");
  problems.hidden = state.problems.length === 0;
  problems.textContent = state.problems.join(" · ");
  drawModels(models);
  drawReplicas(models);
  const parts = Object.entries(state.components).map(([name, up]) => name + (up ? " up" : " DOWN"));
  $("components").textContent = parts.length ? parts.join(" · ") : "(not run by inferoxy serve)";
  if (t.request_rate !== null) {
    rates.push(t.request_rate);
    if (rates.length > HISTORY) rates.shift();
  }
  drawSparkline($("rate"), rates);
  document.body.dataset.loaded = "true";
}

function askForKey(message) {
  $("login").hidden = false;
  $("login-why").textContent = message;
  $("summary").textContent = "an API key is needed";
  $("key").focus();
}

async function poll() {
  timer = null;
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  try {
    const response = await fetch(STATE_URL, { headers, cache: "no-store", credentials: "omit" });
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      sessionStorage.removeItem(KEY);
      askForKey((body.error || "refused") + " (HTTP " + response.status + ")");
      return; // polling resumes when a key is given
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    $("login").hidden = true;
    draw(await response.json());
  } catch (error) {
    $("summary").textContent = "cannot reach the proxy: " + error.message;
  }
  timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    if (timer !== null) clearTimeout(timer);
    poll();
  });
  poll();
});
