// The status page: polls status (relative to /admin/ui, so a path prefix or a port-forward keeps working)
// and draws it with DOM calls only: every value from the proxy is set as text, never parsed as HTML.
"use strict";

const KEY = "resilience-proxy-admin-token";
const EVERY_MS = 2000;
let timer = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function fmtRate(v) { return v == null ? "–" : v.toFixed(v < 10 ? 2 : 1); }
function fmtPct(v) { return v == null ? "–" : (100 * v).toFixed(1) + "%"; }
function fmtP99(v) { return v == null ? "–" : v < 1 ? "≤" + Math.round(v * 1000) + " ms" : "≤" + v + " s"; }
function fmtTime(t) { return new Date(t * 1000).toLocaleTimeString(); }

function spark(values, cls, label) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark " + cls);
  svg.setAttribute("viewBox", "0 0 110 24");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const nums = values.map((v) => (v == null ? 0 : v));
  const max = Math.max(...nums, 1e-9);
  const step = nums.length > 1 ? 108 / (nums.length - 1) : 0;
  const pts = nums.map((v, i) => `${(1 + i * step).toFixed(1)},${(22 - (v / max) * 20).toFixed(1)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.append(line);
  const title = document.createElementNS(ns, "title");
  title.textContent = `${label}: ${values.length} points, max ${max.toFixed(3)}`;
  svg.append(title);
  return svg;
}

function badge(text, cls) { return el("span", { class: "badge " + cls }, text); }

function trackRow(up, t) {
  const transitions = el("ul", { class: "transitions" });
  for (const tr of t.transitions.slice().reverse()) {
    transitions.append(el("li", {}, `${fmtTime(tr.at)} ${tr.from} → ${tr.to}` + (tr.reason ? ` (${tr.reason})` : "")));
  }
  const breaker = el("td", { "data-field": "breaker" }, badge(t.breaker, "state-" + t.breaker), transitions);
  const models = Object.entries(t.model_breakers || {}).filter(([, s]) => s !== "closed");
  if (models.length) breaker.append(el("div", { class: "meta" }, "models: " + models.map(([m, s]) => `${m} ${s}`).join(", ")));
  const weight = el("td", { class: "num", "data-field": "weight" }, `${t.effective_weight}`);
  if (t.effective_weight !== t.weight) weight.append(el("div", { class: "meta" }, `configured ${t.weight}`));
  const canary = el("td", { "data-field": "canary" });
  if (t.aborted) canary.append(badge("aborted", "aborted"));
  if (t.aborts) canary.append(el("div", { class: "meta" }, `${t.aborts} abort${t.aborts === 1 ? "" : "s"}`));
  return el("tr", { "data-upstream": up.name, "data-track": t.name },
    el("td", {}, t.name),
    breaker,
    weight,
    el("td", { class: "num", "data-field": "rate" }, fmtRate(t.rate)),
    el("td", { class: "num", "data-field": "errors" }, fmtPct(t.error_ratio)),
    el("td", { class: "num", "data-field": "p99" }, fmtP99(t.p99_seconds)),
    el("td", { "data-field": "health" }, badge(t.health, "health-" + t.health), t.check ? el("div", { class: "meta" }, "check " + t.check) : ""),
    canary,
    el("td", { "data-field": "sparklines" },
      spark(t.series.rate, "spark-rate", "requests/s"), " ",
      spark(t.series.error_ratio, "spark-err", "failed share"), " ",
      spark(t.series.p99_seconds, "spark-p99", "p99")));
}

function upstreamSection(up) {
  const fb = Object.entries(up.fallbacks).filter(([, v]) => v > 0).map(([r, v]) => `${r} ${fmtRate(v)}/s`);
  const cols = [["track"], ["breaker"], ["weight", "num"], ["req/s", "num"], ["failed", "num"], ["p99", "num"],
    ["health"], ["canary"], ["req/s · failed · p99, last 10 min"]];
  const head = el("tr", {}, ...cols.map(([h, cls]) => el("th", cls ? { class: cls } : {}, h)));
  const table = el("table", {}, el("thead", {}, head), el("tbody", {}, ...up.tracks.map((t) => trackRow(up, t))));
  return el("section", { "data-upstream": up.name },
    el("h2", {}, up.name, " ", el("span", { class: "meta" }, `${up.protocol} · ${up.listen}`), " ",
      badge(up.health, "status-" + up.health)),
    el("div", { class: "meta" },
      `in flight ${up.in_flight} · retries ${fmtRate(up.retry_rate)}/s · cache ${up.cache_entries} entries · fallbacks `,
      el("span", { "data-field": "fallbacks" }, fb.length ? fb.join(", ") : "none")),
    table);
}

function render(s) {
  document.getElementById("summary").textContent =
    `${s.ready ? "ready" : "not ready"} · version ${s.version} · config ${s.config_hash}`;
  document.getElementById("updated").textContent = "updated " + fmtTime(s.generated_at);
  document.getElementById("upstreams").replaceChildren(...s.upstreams.map(upstreamSection));
  document.body.dataset.loaded = "true";
}

function showLogin(message) {
  const form = document.getElementById("login");
  form.hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("token").focus();
}

async function refresh() {
  const token = sessionStorage.getItem(KEY);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  let resp;
  try {
    resp = await fetch("status", { headers, cache: "no-store" });
  } catch (e) {
    document.getElementById("error").hidden = false;
    document.getElementById("error").textContent = "the admin API does not answer: " + e;
    return schedule();
  }
  if (resp.status === 401 || resp.status === 403) {
    if (token) sessionStorage.removeItem(KEY);
    showLogin(token ? "that token was refused" : "");
    return;  // polling resumes once a token is given
  }
  document.getElementById("error").hidden = !(resp.ok === false);
  if (!resp.ok) {
    document.getElementById("error").textContent = `/admin/status answered ${resp.status}`;
    return schedule();
  }
  document.getElementById("login").hidden = true;
  render(await resp.json());
  schedule();
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, EVERY_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = document.getElementById("token").value.trim();
    if (value) sessionStorage.setItem(KEY, value);
    document.getElementById("token").value = "";
    refresh();
  });
  refresh();
});
