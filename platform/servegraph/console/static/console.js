// servegraph console: no library, no build step. Reads /console/api/... with the key
// kept in this tab's sessionStorage (sent as the Authorization header, never in a URL).
"use strict";

const BASE = location.pathname.replace(/\/+$/, "");
const API = BASE + "/api";
const KEY = "servegraph-console-key";
const REFRESH_MS = 5000;
// `nav` counts navigations: an answer that comes back after a newer one began is dropped
// (a slow page must not draw over the next); `run`: the form's run, aborted on leaving.
const state = { timer: null, history: new Map(), shown: null, nav: 0, run: null };

function stale(nav) {
  return nav !== state.nav;
}

const $ = (id) => document.getElementById(id);
const esc = (value) =>
  String(value ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const ms = (v) => (v == null ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(1)} ms`);
const pct = (v) => (v == null ? "–" : `${(v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 0)}%`);
const usd = (v) => (v == null ? "–" : v === 0 ? "$0" : `$${v.toExponential(2)}`);
const rate = (v) => (v == null ? "–" : v >= 1 ? `${v.toFixed(1)}/s` : `${(v * 60).toFixed(1)}/min`);

function key() {
  return sessionStorage.getItem(KEY);
}

class HttpError extends Error {
  constructor(status, body) {
    super(`${status}: ${typeof body === "string" ? body : JSON.stringify(body)}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path.startsWith("/") ? path : `${API}/${path}`, {
    ...options,
    headers: { authorization: `Bearer ${key()}`, ...(options.headers || {}) },
  });
  if (!response.ok) {
    let body = await response.text();
    try { body = JSON.parse(body); } catch (_) { /* plain text */ }
    throw new HttpError(response.status, body);
  }
  return response;
}

function show(section) {
  for (const id of ["key-panel", "home", "pipeline"]) $(id).hidden = id !== section;
}

function askForKey(message) {
  show("key-panel");
  $("key-error").textContent = message || "";
  $("key").focus();
}

function windowS() {
  return Number($("window").value);
}

// ---------------------------------------------------------------- home

async function home(nav) {
  const data = await (await api(`pipelines?window_s=${windowS()}`)).json();
  if (stale(nav)) return;
  show("home");
  document.title = "servegraph console";
  const whose = data.tenants === "every tenant" ? "every tenant's" : `tenant ${data.tenants}'s`;
  $("home-note").textContent =
    `From the last ${data.ring} requests this ingress replica answered (${whose}): ` +
    `${Math.round(data.covered_s)} s of the ${data.window_s / 60} min window are in it.`;
  $("pipelines").tBodies[0].innerHTML = data.pipelines
    .map((p) => {
      const f = p.figures;
      return `<tr><th scope="row"><a href="#/p/${esc(p.name)}">${esc(p.name)}</a>
        <div class="muted">${esc(p.description)}</div></th>
        <td>${rate(f.rate_per_s)}</td><td>${ms(f.p50_ms)}</td><td>${ms(f.p99_ms)}</td>
        <td>${pct(f.error_share)}</td><td>${pct(f.deadline_share)}</td><td>${usd(f.mean_usd)}</td>
        <td>${p.can_run ? "may run" : `figures only (needs ${esc(p.scope)})`}</td></tr>`;
    })
    .join("");
  await servers(nav);
}

async function servers(nav) {
  const data = await (await api(`servers?window_s=${windowS()}`)).json();
  if (stale(nav)) return;
  const prom = data.prometheus;
  const notes = [];
  if (!data.available) notes.push(`Serve's status is not available here (${data.reason}).`);
  if (!prom.available) {
    notes.push(
      `Prometheus is not answering at ${prom.url} (${prom.reason}): start it with ` +
        "`make observe` for the replicas, queue and batch sizes over time. Shown: the " +
        "replicas now, and since this page opened."
    );
  }
  $("servers-note").textContent = notes.join(" ");
  $("servers").hidden = !data.available;
  const rows = data.servers.map((s) => {
    const name = `${s.application}/${s.deployment}`;
    const seen = state.history.get(name) || [];
    seen.push([data.at, s.running]);
    while (seen.length > 120) seen.shift(); // ten minutes at one point per 5 s
    state.history.set(name, seen);
    const series = (prom.available && prom.series[name]) || {};
    const charts = prom.available
      ? [
          ["replicas", series.replicas],
          ["queued", series.queued],
          ["in progress", series.ongoing],
          ["batch size", series.batch_size],
        ]
          .map(([label, points]) =>
            points && points.length
              ? `<div class="chart"><span>${label}</span>${spark(points, `${name} ${label}`)}</div>`
              : `<div class="chart"><span>${label}</span><span class="muted">no data</span></div>`
          )
          .join("")
      : spark(seen, `${name} replicas`);
    const events = ((prom.available && prom.events[name]) || [])
      .map((e) => `${new Date(e.at * 1000).toLocaleTimeString()}: ${e.from} → ${e.to}`)
      .join("<br>");
    return `<tr data-deployment="${esc(name)}"><td>${esc(s.application)}</td>
      <th scope="row">${esc(s.deployment)}</th><td>${esc(s.status)}</td><td>${s.running}</td>
      <td class="charts">${charts}</td><td>${events || '<span class="muted">none</span>'}</td></tr>`;
  });
  $("servers").tBodies[0].innerHTML = rows.join("");
}

function spark(series, name) {
  const width = 140, height = 26;
  const values = series.map((p) => p[1]).filter((v) => Number.isFinite(v));
  const most = Math.max(1, ...values);
  const step = series.length > 1 ? width / (series.length - 1) : width;
  const points = series
    .map((p, i) => [i * step, Number.isFinite(p[1]) ? p[1] : 0])
    .map(([x, v]) => `${x.toFixed(1)},${(height - 2 - (v / most) * (height - 4)).toFixed(1)}`)
    .join(" ");
  const last = values.length ? values[values.length - 1] : null;
  const shown = (v) => (v == null ? "–" : Number.isInteger(v) ? String(v) : v.toFixed(1));
  return `<span class="spark-row"><svg class="spark" width="${width}" height="${height}" role="img"
    aria-label="${esc(name)}: now ${shown(last)}, at most ${shown(Math.max(0, ...values))}">
    <polyline fill="none" stroke="#1f5fa8" stroke-width="1.5" points="${points}"/></svg>
    <span>${shown(last)}</span></span>`;
}

// ---------------------------------------------------------------- a pipeline

async function pipeline(name, fresh, nav) {
  const data = await (await api(`pipelines/${encodeURIComponent(name)}?window_s=${windowS()}`)).json();
  if (stale(nav)) return;
  show("pipeline");
  document.title = `${name} · servegraph console`;
  $("p-title").textContent = `${name} (version ${data.version})`;
  $("p-description").textContent = data.description || "";
  const f = data.figures.pipeline;
  $("p-figures").textContent =
    `${f.count} requests in the last ${Math.round(data.figures.covered_s)} s (the ring's part of the window) · ` +
    `${rate(f.rate_per_s)} · p50 ${ms(f.p50_ms)} · p99 ${ms(f.p99_ms)} · ` +
    `errors ${pct(f.error_share)} · deadline misses ${pct(f.deadline_share)} · mean ${usd(f.mean_usd)}`;
  if (fresh) {
    $("answer").textContent = "";
    $("run-waterfall").innerHTML = "";
    $("request-detail").innerHTML = "";
    $("run-status").textContent = "";
    $("graph").innerHTML = "";
    const picture = await drawing(name);
    if (stale(nav)) return;
    $("graph").innerHTML = picture;
    $("graph").classList.toggle("fit", $("fit").checked);
    buildForm(data); // says so in the status when the key may not run it
    state.shown = name; // drawn: refreshes only repaint it
  }
  let servers = null;
  try {
    servers = await (await api(`servers?window_s=${windowS()}`)).json();
  } catch (_) { /* the figures without the servers' line */ }
  if (stale(nav)) return;
  paintFigures(data.figures.nodes, data.calls, servers);
  $("recent").tBodies[0].innerHTML = data.recent
    .map(
      (r) => `<tr><td><a href="#/p/${esc(name)}/r/${esc(r.id)}" data-request="${esc(r.id)}">
        ${esc(new Date(r.at * 1000).toLocaleTimeString())}</a></td>
        <td class="${r.status >= 400 ? "bad" : ""}">${r.status}</td><td>${ms(r.total_ms)}</td>
        <td>${usd(r.usd)}</td><td>${esc(r.key)}</td><td>${esc(r.tenant)}</td>
        <td>${esc(r.version)}</td><td>${esc(r.cache || "")}</td><td>${r.nodes}</td></tr>`
    )
    .join("");
}

// The graph's drawing as HTML: the SVG (drawn at its own size, readable, the box
// scrolling; "fit" shrinks it to the box), or why there is none and the graph as text.
async function drawing(name) {
  const response = await api(`pipelines/${encodeURIComponent(name)}/graph.svg`);
  const text = await response.text();
  if (!(response.headers.get("content-type") || "").startsWith("image/svg+xml")) {
    const failed = JSON.parse(text); // {error, text}
    return `<p class="error">${esc(failed.error)}</p><pre>${esc(failed.text)}</pre>`;
  }
  // Hidden from assistive technology: the figures are in the tables; the box is labelled.
  return text.replace("<svg", '<svg aria-hidden="true"');
}

function colour(f) {
  if (!f || !f.count) return "#f4f6f8";
  if (f.error_share >= 0.05 || f.deadline_share >= 0.01) return "#f6c1bd";
  if (f.error_share > 0) return "#fbe3a9";
  return "#cfeccf";
}

function paintFigures(nodes, calls, servers) {
  for (const g of $("graph").querySelectorAll("g.node")) {
    const name = g.id.replace(/^node:/, "");
    const texts = g.querySelectorAll("text");
    if (texts.length < 4) continue; // an input or output: lines 3 and 4 are the figures
    const f = nodes[name];
    const shape = g.querySelector("path, polygon");
    if (shape) shape.setAttribute("fill", colour(f));
    texts[2].textContent = f
      ? `${rate(f.rate_per_s)} · p50 ${ms(f.p50_ms)} · p99 ${ms(f.p99_ms)}`
      : "no calls in the window";
    texts[3].textContent = f
      ? `err ${pct(f.error_share)} · miss ${pct(f.deadline_share)} · ${usd(f.mean_usd)}`
      : "";
    if (g.classList.contains("call") && texts.length > 4) texts[4].textContent = serverLine(calls[name], servers);
  }
}

// A call node's model server now: its deployment's running replicas (Serve's) and what
// is queued for it (Prometheus's latest, when one answers).
function serverLine(deployment, servers) {
  if (!deployment || !servers || !servers.available) return "";
  const row = servers.servers.find((s) => `${s.application}/${s.deployment}` === deployment);
  if (!row) return "";
  const prom = servers.prometheus;
  const queued = prom.available ? ((prom.series[deployment] || {}).queued || []).slice(-1)[0] : null;
  return `replicas ${row.running} · queued ${queued ? queued[1] : prom.available ? 0 : "–"}`;
}

// ---------------------------------------------------------------- the form

function fieldFor(name, schema, required, defs) {
  const spec = schema.$ref ? defs[schema.$ref.split("/").pop()] : schema;
  const type = spec.type || (spec.anyOf || []).map((s) => s.type).find((t) => t && t !== "null");
  const id = esc(`field-${name}`);
  const label = `<label for="${id}">${esc(spec.title || name)}${required ? " *" : ""}</label>`;
  const help = spec.description ? `<div class="muted">${esc(spec.description)}</div>` : "";
  const value = spec.default !== undefined && spec.default !== null ? spec.default : "";
  let input;
  if (type === "string" && (spec.maxLength || 0) <= 200 && !spec.enum) {
    input = `<input id="${id}" name="${esc(name)}" data-type="string" value="${esc(value)}"${required ? " required" : ""}>`;
  } else if (type === "string" && !spec.enum) {
    input = `<textarea id="${id}" name="${esc(name)}" data-type="string" rows="3"${required ? " required" : ""}>${esc(value)}</textarea>`;
  } else if (spec.enum) {
    input = `<select id="${id}" name="${esc(name)}" data-type="string">${spec.enum
      .map((v) => `<option${v === value ? " selected" : ""}>${esc(v)}</option>`)
      .join("")}</select>`;
  } else if (type === "integer" || type === "number") {
    input = `<input id="${id}" name="${esc(name)}" data-type="number" type="number" step="${type === "integer" ? 1 : "any"}" value="${esc(value)}"${required ? " required" : ""}>`;
  } else if (type === "boolean") {
    input = `<input id="${id}" name="${esc(name)}" data-type="boolean" type="checkbox"${value ? " checked" : ""}>`;
  } else {
    input = `<textarea id="${id}" name="${esc(name)}" data-type="json" rows="3">${esc(
      value === "" ? "" : JSON.stringify(value)
    )}</textarea>`;
  }
  return `<div class="field">${label}${input}${help}</div>`;
}

function buildForm(data) {
  const schema = data.input_schema;
  const required = new Set(schema.required || []);
  const fields = Object.entries(schema.properties || {}).map(([name, spec]) =>
    fieldFor(name, spec, required.has(name), schema.$defs || {})
  );
  const form = $("run-form");
  form.innerHTML =
    fields.join("") +
    `<button type="submit"${data.can_run ? "" : ' aria-describedby="run-status"'}>Run ${esc(data.name)}</button>`;
  form.dataset.route = data.route;
  if (!data.can_run) {
    $("run-status").textContent = `This key may read ${data.name}'s figures but not run it (it needs ${data.scope}).`;
  }
}

function formBody(form) {
  const body = {};
  for (const element of form.querySelectorAll("[name]")) {
    const raw = element.type === "checkbox" ? element.checked : element.value;
    if (raw === "" && !element.required) continue;
    if (element.dataset.type === "number") body[element.name] = Number(raw);
    else if (element.dataset.type === "json") body[element.name] = JSON.parse(raw);
    else body[element.name] = raw;
  }
  return body;
}

async function run(event) {
  event.preventDefault();
  const form = event.target;
  const answer = $("answer"), status = $("run-status");
  let body;
  try {
    body = formBody(form);
  } catch (error) {
    status.textContent = `A field is not valid JSON: ${error.message}`;
    return;
  }
  stopRun();
  const controller = (state.run = new AbortController());
  const button = form.querySelector("button[type=submit]");
  button.disabled = true; // one run at a time in this panel
  answer.textContent = "";
  answer.dataset.chunks = "0";
  delete status.dataset.done;
  status.textContent = "Running…";
  $("run-waterfall").innerHTML = "";
  const attempts = [];
  try {
    const response = await api(`${form.dataset.route}/stream`, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    const cache = response.headers.get("x-servegraph-cache");
    for await (const [kind, data] of events(response)) {
      if (kind === "chunk" && typeof data.text === "string") {
        answer.textContent += data.text;
        answer.dataset.chunks = String(Number(answer.dataset.chunks || 0) + 1);
      } else if (kind === "node") {
        attempts.push(data);
        $("run-waterfall").innerHTML = waterfall(attempts, null);
      } else if (kind === "usage") {
        status.textContent = `Done in ${ms(data.total_ms)}, ${usd(data.usd)}${cache ? ` (cache ${cache})` : ""}.`;
      } else if (kind === "result") {
        if (!answer.textContent) answer.textContent = JSON.stringify(data, null, 2);
        status.dataset.done = "true";
      } else if (kind === "error") {
        status.textContent = `Failed: ${data.status} ${data.error} at ${data.node || "?"}: ${data.detail}`;
      } else if (kind === "waiting") {
        status.textContent = `Waiting for a person's decision (run ${data.run_id}).`;
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return; // left for another page: nothing to show
    if (error.status === 401) return forgetKey("The key was refused (401).");
    status.textContent = describeError(error);
  } finally {
    button.disabled = false;
    if (state.run === controller) state.run = null;
  }
}

function stopRun() {
  if (state.run) state.run.abort();
  state.run = null;
}

function describeError(error) {
  if (error.status === 401) return "The key was refused (401): enter it again.";
  if (error.status === 403) return `Refused (403): ${error.body?.detail || error.message}`;
  if (error.status === 422) return `Refused (422): ${JSON.stringify(error.body?.detail || error.body)}`;
  return `Failed: ${error.message}`;
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield [kind, JSON.parse(data)];
    }
  }
}

// ---------------------------------------------------------------- waterfalls

function waterfall(attempts, total) {
  const end = Math.max(total || 0, ...attempts.map((a) => a.start_ms + a.wall_ms), 1);
  const rows = attempts.map((a) => {
    const left = (100 * a.start_ms) / end, width = Math.max(0.4, (100 * a.wall_ms) / end);
    const tokens = a.tokens || a.usage;
    const facts = [
      `attempt ${a.attempt}`,
      a.status,
      ms(a.wall_ms),
      tokens ? `${tokens.input} in / ${tokens.output} out tokens` : "",
      a.call && a.call.batch_size ? `batch of ${a.call.batch_size}, queued ${ms(a.call.queue_wait_ms)}` : "",
      a.usd ? usd(a.usd) : "",
      a.error ? `error: ${a.error}` : "",
    ].filter(Boolean);
    return `<li class="attempt ${esc(a.status)}" data-node="${esc(a.node)}" data-attempt="${a.attempt}"
        data-start-ms="${a.start_ms}" data-wall-ms="${a.wall_ms}" data-status="${esc(a.status)}">
      <span class="label">${esc(a.node)}</span>
      <span class="track"><span class="bar" style="left:${left.toFixed(2)}%;width:${width.toFixed(2)}%"></span></span>
      <span class="facts">${esc(facts.join(" · "))}</span></li>`;
  });
  return `<ol class="attempts" aria-label="Node attempts over ${esc(ms(end))}">${rows.join("")}</ol>`;
}

async function requestDetail(name, id, nav) {
  if (state.shown !== name) await pipeline(name, true, nav);
  const panel = $("request-detail");
  try {
    const r = await (await api(`requests/${encodeURIComponent(id)}`)).json();
    if (stale(nav)) return;
    panel.innerHTML = `<h3>Request ${esc(r.id)}: ${r.status}, ${ms(r.total_ms)}, ${usd(r.usd)},
      key ${esc(r.key)}, tenant ${esc(r.tenant)}${r.trace_id ? `, trace ${esc(r.trace_id)}` : ""}</h3>
      ${waterfall(r.attempts, r.total_ms)}`;
  } catch (error) {
    if (!stale(nav)) panel.innerHTML = `<p class="error">${esc(describeError(error))}</p>`;
  }
}

// ---------------------------------------------------------------- routing

function schedule(nav) {
  clearTimeout(state.timer);
  if (!stale(nav)) state.timer = setTimeout(refresh, REFRESH_MS);
}

function leave() {
  // A navigation: what the previous view was still doing is dropped.
  state.nav += 1;
  clearTimeout(state.timer);
  $("page-error").textContent = "";
  return state.nav;
}

async function route() {
  const nav = leave();
  if (!key()) {
    askForKey();
    document.body.dataset.ready = "true";
    return;
  }
  const match = location.hash.match(/^#\/p\/([^/]+)(?:\/r\/(.+))?$/);
  const name = match ? decodeURIComponent(match[1]) : null;
  if (state.run && name !== state.shown) stopRun();
  try {
    if (match && match[2]) await requestDetail(name, decodeURIComponent(match[2]), nav);
    else if (match) await pipeline(name, state.shown !== name, nav);
    else {
      state.shown = null;
      await home(nav);
    }
    if (stale(nav)) return;
    document.body.dataset.ready = "true";
    // Since the navigation began: the benchmark's time to interactive (the first view).
    if (window.consoleReadyMs === undefined) window.consoleReadyMs = performance.now();
  } catch (error) {
    if (stale(nav)) return;
    if (error.status === 401) {
      forgetKey("The key was refused (401).");
      document.body.dataset.ready = "true";
      return;
    }
    $("page-error").textContent = describeError(error);
  }
  schedule(nav);
}

async function refresh() {
  const nav = state.nav;
  try {
    if (state.shown) await pipeline(state.shown, false, nav);
    else if (!$("home").hidden) await home(nav);
  } catch (_) { /* shown on the next navigation */ }
  schedule(nav);
}

function forgetKey(message) {
  sessionStorage.removeItem(KEY);
  leave();
  stopRun();
  state.shown = null; // another key may see and run other things: draw everything again
  askForKey(message);
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  state.shown = null; // another key may run other pipelines: draw the page again
  route();
});
$("forget").addEventListener("click", () => forgetKey());
$("window").addEventListener("change", () => route());
$("fit").addEventListener("change", () => $("graph").classList.toggle("fit", $("fit").checked));
$("run-form").addEventListener("submit", run);
window.addEventListener("hashchange", route);
route();
