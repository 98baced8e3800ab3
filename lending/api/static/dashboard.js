// The lending dashboard: one EventSource on v1/dashboard/stream, a snapshot a second.
// The server aggregates; this script only keeps the window of seconds and the latest
// outcomes it was sent, and draws them. Text goes in with textContent, never as HTML.
"use strict";

const MAX_BIN_CELLS = 400; // a bigger storage is drawn with several bins per cell
const MAX_OUTCOME_ROWS = 50;
const SVG = "http://www.w3.org/2000/svg";

const state = { seconds: new Map(), outcomes: [], windowS: 300, lastAt: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

const integer = new Intl.NumberFormat("en", { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat("en", { maximumFractionDigits: 1 });
function num(value) { return value === null || value === undefined ? "—" : integer.format(value); }
function ms(value) {
  // Stream IDs are stamped in whole milliseconds: so are the latencies.
  return value === null || value === undefined ? "—" : `${integer.format(value)} ms`;
}
function duration(millis) {
  if (millis === null || millis === undefined) return "—";
  const s = millis / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  return `${Math.floor(s / 86400)} d ${String(Math.floor((s % 86400) / 3600)).padStart(2, "0")} h`;
}
function clock(idOrMs) {
  const millis = typeof idOrMs === "number" ? idOrMs : Number(String(idOrMs).split("-")[0]);
  return new Date(millis).toLocaleTimeString("en-GB", { hour12: false });
}

function replaceRows(tbody, rows, columns, emptyText) {
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", emptyText, "empty");
    td.colSpan = columns;
    tr.append(td);
    tbody.replaceChildren(tr);
    return;
  }
  tbody.replaceChildren(...rows);
}

// -- status ---------------------------------------------------------------------------

function renderStorage(storage) {
  const { books, capacity } = storage;
  $("storage-figure").textContent = `${num(books)} / ${num(capacity)}`;
  const perCell = Math.max(1, Math.ceil(capacity / MAX_BIN_CELLS));
  const cells = Math.ceil(capacity / perCell);
  $("storage-note").textContent =
    `${num(books)} of ${num(capacity)} bins filled, ${num(Math.max(0, capacity - books))} empty` +
    (perCell > 1 ? ` (a square is ${num(perCell)} bins)` : "");
  const bins = $("bins");
  bins.setAttribute("aria-label", `storage bins: ${books} of ${capacity} filled`);
  bins.dataset.filled = String(books);
  const children = [];
  for (let i = 0; i < cells; i++) {
    const filled = Math.min(perCell, Math.max(0, books - i * perCell));
    const cell = el("div", null, "bin");
    if (filled >= Math.min(perCell, capacity - i * perCell)) cell.classList.add("filled");
    else if (filled > 0) {
      cell.classList.add("part");
      cell.style.setProperty("--fill", `${Math.round((100 * filled) / perCell)}%`);
    }
    children.push(cell);
  }
  bins.replaceChildren(...children);
}

function renderWorkers(workers) {
  const rows = workers.map((w) => {
    const tr = el("tr");
    tr.append(
      el("td", w.worker_id, "wrap"),
      el("td", w.heartbeat_age_ms === null ? "measuring…" : `${duration(w.heartbeat_age_ms)} ago`, "num"),
      el("td", duration(w.ttl_ms), "num"),
      el("td", num(w.processed), "num"),
      el("td", num(w.failed), "num"),
      el("td", w.uptime_s === null ? "—" : duration(w.uptime_s * 1000), "num"),
    );
    return tr;
  });
  replaceRows($("workers"), rows, 6, "no live worker: requests wait in their streams");
}

function renderGroups(groups) {
  const rows = groups.map((g) => {
    const tr = el("tr");
    tr.append(el("td", g.stream), el("td", g.group));
    if (!g.exists) {
      const td = el("td", "not created yet", "empty");
      td.colSpan = 3;
      tr.append(td);
      return tr;
    }
    const oldest = g.oldest_pending_age_ms === null ? "—" : `${duration(g.oldest_pending_age_ms)} old`;
    tr.append(el("td", num(g.lag), "num"), el("td", num(g.pending), "num"), el("td", oldest, "num"));
    if (g.dead_consumers) tr.title = `${g.dead_consumers} dead consumer(s) hold entries`;
    return tr;
  });
  replaceRows($("groups"), rows, 5, "no group");
}

function renderStatus(snapshot) {
  const status = snapshot.status;
  const connection = $("connection");
  if (snapshot.status_error) {
    connection.className = "connection down";
    connection.textContent = `Redis: ${snapshot.status_error}`;
  }
  if (!status) return;
  $("books-lent").textContent = num(status.books_lent);
  $("dead-letters").textContent = num(status.dead_letters);
  $("dead-letters-box").classList.toggle("alert", status.dead_letters > 0);
  renderStorage(status.storage);
  renderWorkers(status.workers);
  renderGroups(status.groups);
}

// -- charts ---------------------------------------------------------------------------

const CHART = { width: 600, height: 150, left: 44, right: 8, top: 8, bottom: 20 };

function niceMax(value) {
  if (value <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * magnitude) return step * magnitude;
  return 10 * magnitude;
}

function drawChart(svg, title, seriesList, nowS, unit) {
  const { width, height, left, right, top, bottom } = CHART;
  const x0 = nowS - state.windowS;
  const values = seriesList.flatMap((s) => s.points.map((p) => p[1]));
  const max = niceMax(Math.max(0, ...values));
  const x = (t) => left + ((t - x0) / state.windowS) * (width - left - right);
  const y = (v) => height - bottom - (v / max) * (height - top - bottom);
  const nodes = [svgEl("title", {})];
  nodes[0].textContent = title;
  for (const fraction of [0, 0.5, 1]) {
    const v = max * fraction;
    nodes.push(svgEl("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    const label = svgEl("text", { class: "axis", x: left - 4, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = `${decimal.format(v)}${unit}`;
    nodes.push(label);
  }
  const minutes = Math.round(state.windowS / 60);
  for (const [t, text, anchor] of [[x0, `−${minutes} min`, "start"], [nowS, "now", "end"]]) {
    const label = svgEl("text", { class: "axis", x: x(t), y: height - 4, "text-anchor": anchor });
    label.textContent = text;
    nodes.push(label);
  }
  for (const series of seriesList) {
    const points = series.points.filter((p) => p[0] >= x0 && p[1] !== null);
    if (!points.length) continue;
    const line = points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    if (series.area) {
      const first = x(points[0][0]).toFixed(1);
      const last = x(points[points.length - 1][0]).toFixed(1);
      const base = y(0).toFixed(1);
      nodes.push(svgEl("polygon", { class: `${series.className}-area`, points: `${first},${base} ${line} ${last},${base}` }));
    }
    nodes.push(svgEl("polyline", { class: series.className, points: line }));
  }
  svg.replaceChildren(...nodes);
}

function renderCharts(snapshot) {
  const seconds = [...state.seconds.values()].sort((a, b) => a.t - b.t);
  const nowS = Math.floor(snapshot.at_ms / 1000);
  const rate = seconds.map((s) => [s.t, s.count]);
  const p50 = seconds.map((s) => [s.t, s.p50_ms]);
  const p99 = seconds.map((s) => [s.t, s.p99_ms]);
  const last = seconds[seconds.length - 1];
  const peak = Math.max(0, ...seconds.map((s) => s.count));
  $("rate-now").textContent = last ? num(last.count) : "—";
  $("latency-now").textContent = last && last.p50_ms !== null ? `${num(last.p50_ms)} / ${ms(last.p99_ms)}` : "—";
  drawChart(
    $("rate-chart"),
    `Outcomes per second over the ${windowText()}: ` +
      `${last ? num(last.count) : "none"} in the last second, peak ${num(peak)}`,
    [{ points: rate, className: "rate", area: true }],
    nowS,
    "",
  );
  drawChart(
    $("latency-chart"),
    `Latency from queued to outcome, p50 and p99 per second` +
      (last && last.count ? `: last second p50 ${ms(last.p50_ms)}, p99 ${ms(last.p99_ms)}` : ""),
    [{ points: p50, className: "p50" }, { points: p99, className: "p99" }],
    nowS,
    " ms",
  );
}

function windowText() {
  const minutes = Math.round(state.windowS / 60);
  return minutes <= 1 ? "last minute" : `last ${minutes} minutes`;
}

// -- outcomes -------------------------------------------------------------------------

function renderOutcomes(snapshot, fresh) {
  const rows = state.outcomes.map((o) => {
    const tr = el("tr");
    if (fresh.has(o.event_id)) tr.className = "new";
    const books = o.books.join(", ") + (o.book_count > o.books.length ? ` +${o.book_count - o.books.length}` : "");
    tr.append(
      el("td", clock(o.event_id)),
      el("td", o.action),
      el("td", o.status, `status ${o.status}`),
      el("td", o.user_id, "wrap"),
      el("td", books || (o.skipped ? `(${o.skipped} skipped)` : "—"), "wrap"),
      el("td", ms(o.latency_ms), "num"),
      el("td", o.reason || "", "wrap"),
    );
    return tr;
  });
  replaceRows($("outcomes"), rows, 7, "no outcome yet");
  $("outcomes-seen").textContent = `(${num(snapshot.outcomes_seen)} seen by this API process)`;
  $("outcomes").dataset.newest = state.outcomes.length ? state.outcomes[0].event_id : "";
}

// -- the stream -----------------------------------------------------------------------

function merge(snapshot) {
  state.windowS = snapshot.window_s;
  state.lastAt = snapshot.at_ms;
  for (const second of snapshot.seconds) state.seconds.set(second.t, second);
  const oldest = Math.floor(snapshot.at_ms / 1000) - state.windowS;
  for (const t of state.seconds.keys()) if (t < oldest) state.seconds.delete(t);
  const known = new Set(state.outcomes.map((o) => o.event_id));
  const fresh = new Set(snapshot.outcomes.filter((o) => !known.has(o.event_id)).map((o) => o.event_id));
  const byId = new Map([...snapshot.outcomes, ...state.outcomes].map((o) => [o.event_id, o]));
  state.outcomes = [...byId.values()]
    .sort((a, b) => compareIds(b.event_id, a.event_id))
    .slice(0, MAX_OUTCOME_ROWS);
  return fresh;
}

function compareIds(a, b) {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  if (am !== bm) return am < bm ? -1 : 1;
  return as === bs ? 0 : as < bs ? -1 : 1;
}

function render(snapshot) {
  const fresh = merge(snapshot);
  $("namespace").textContent = `namespace ${snapshot.namespace}`;
  $("window").textContent = windowText();
  const connection = $("connection");
  connection.className = "connection live";
  connection.textContent =
    `live, updated ${clock(snapshot.at_ms)}` + (snapshot.tail_connected ? "" : " (events tail reconnecting to Redis)");
  renderStatus(snapshot);
  renderCharts(snapshot);
  renderOutcomes(snapshot, fresh);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const source = new EventSource("v1/dashboard/stream");
  source.addEventListener("snapshot", (message) => render(JSON.parse(message.data)));
  source.addEventListener("error", () => {
    const connection = $("connection");
    connection.className = "connection down";
    connection.textContent = `disconnected${state.lastAt ? `, last update ${clock(state.lastAt)}` : ""}; retrying…`;
  });
}

connect();
