// shoal's web console (issue 23): polls /v1/cluster (and, served by a node, its /v1/stats)
// every two seconds with the API key the user gave (kept for the browser tab only), draws
// the map, charts rates from successive counts on canvases, searches through the JSON
// API, and acts through the admin routes (the coordinators check the key's role).
"use strict";

const POLL_MS = 2000;
const HISTORY = 60;
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("shoal-key") || "";
const series = { qps: [], p50: [], p99: [], ingest: [] };
let last = null;

// A key in the address's fragment (#key=...) is taken once and removed from the address.
if (location.hash.startsWith("#key=")) {
  key = decodeURIComponent(location.hash.slice(5));
  sessionStorage.setItem("shoal-key", key);
  window.history.replaceState(null, "", location.pathname);
}

function banner(text) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { "authorization": "Bearer " + key, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await r.json().catch(() => ({ code: "UNKNOWN", message: "not JSON" }));
  if (!r.ok) throw new Error(`${json.code}: ${json.message}`);
  return json;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, columns) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const r of rows) {
    const tr = body.insertRow();
    for (const [get, cls] of columns) cell(tr, get(r), cls ? cls(r) : "");
  }
}

// Served by a node: its charts and the search box; by a coordinator: the map only.
let servedByNode = true;

function renderCluster(c) {
  servedByNode = c.node !== undefined;
  for (const el of document.querySelectorAll(".node-only")) el.hidden = !servedByNode;
  $("where").textContent = (servedByNode ? `node ${c.node}` : `coordinator ${c.coordinator}`) +
    ` · map v${c.map_version}`;
  const co = c.coordinators;
  $("coordinators").textContent = co.error
    ? `unreachable: ${co.error}`
    : `leader ${co.leader} (${co.leader_addr}), term ${co.term}; members ` +
      co.members.map((m) => `${m.id}${m.voter ? "" : " (learner)"} ${m.api_addr}`).join(", ");
  fill("nodes", c.nodes, [[(n) => n.id], [(n) => n.addr], [(n) => n.state, (n) => "state-" + n.state], [(n) => n.replicas]]);
  // An action per node: drain it (its replicas move elsewhere), or undo a drain.
  for (const tr of $("nodes").tBodies[0].rows) {
    const id = tr.cells[0].textContent;
    const draining = tr.cells[2].textContent === "draining";
    const b = document.createElement("button");
    b.className = "drain";
    b.dataset.node = id;
    b.dataset.undo = draining ? "1" : "";
    b.textContent = draining ? "Undrain" : "Drain";
    tr.insertCell().append(b);
  }
  fill("operations", c.operations, [
    [(o) => o.id], [(o) => o.kind], [(o) => o.collection], [(o) => o.state, (o) => "state-" + o.state],
    [(o) => o.steps.map((s) => `${s.shard}:${s.state}`).join(" ")],
  ]);
  const box = $("collections");
  box.replaceChildren();
  const select = $("collection");
  const chosen = select.value;
  select.replaceChildren();
  for (const col of c.collections) {
    select.add(new Option(col.name, col.name, false, col.name === chosen));
    const div = document.createElement("div");
    div.className = "collection";
    const h = document.createElement("h3");
    h.textContent = `${col.name} · ${col.dimension}-d · ${col.shard_count} shards · RF ${col.replication_factor}` +
      (col.model ? ` · ${col.model}` : "") + " ";
    // An action: the node refuses it unless the key holds the admin role.
    const build = document.createElement("button");
    build.textContent = "Build index";
    build.className = "build";
    build.dataset.collection = col.name;
    h.append(build);
    const t = document.createElement("table");
    const head = t.createTHead().insertRow();
    for (const x of ["shard", "primary", "epoch", "generation", "replicas (node state lag gen docs)"]) cell(head, x);
    const tb = t.createTBody();
    for (const s of col.shards) {
      const tr = tb.insertRow();
      cell(tr, s.index);
      cell(tr, s.primary);
      cell(tr, s.epoch);
      cell(tr, s.serving_generation + (s.building_generation ? ` (building ${s.building_generation})` : ""));
      cell(tr, s.replicas.map((r) => `${r.node} ${r.state} ${r.lag} g${r.serving_generation} ${r.live_docs}`).join(" | "));
    }
    div.append(h, t);
    box.append(div);
  }
}

function chart(id, series, colors) {
  const cv = $(id);
  const g = cv.getContext("2d");
  g.clearRect(0, 0, cv.width, cv.height);
  const max = Math.max(1e-9, ...series.flat().filter((x) => x !== null));
  g.font = "10px sans-serif";
  g.fillStyle = "#57606a";
  g.fillText(max.toFixed(max < 10 ? 2 : 0), 2, 10);
  series.forEach((s, i) => {
    g.strokeStyle = colors[i];
    g.beginPath();
    s.forEach((y, x) => {
      if (y === null) return;
      const px = (x / (HISTORY - 1)) * cv.width;
      const py = cv.height - (y / max) * (cv.height - 14);
      x === 0 ? g.moveTo(px, py) : g.lineTo(px, py);
    });
    g.stroke();
  });
}

function renderStats(s) {
  const now = performance.now();
  if (last) {
    const dt = (now - last.at) / 1000;
    series.qps.push((s.searches - last.searches) / dt);
    series.ingest.push((s.ingested_documents - last.ingested_documents) / dt);
    series.p50.push(s.p50_ms);
    series.p99.push(s.p99_ms);
    for (const k of Object.keys(series)) if (series[k].length > HISTORY) series[k].shift();
  }
  last = { at: now, searches: s.searches, ingested_documents: s.ingested_documents };
  chart("qps", [series.qps], ["#0b6bcb"]);
  chart("latency", [series.p50, series.p99], ["#137333", "#b3261e"]);
  chart("ingest", [series.ingest], ["#8250df"]);
}

async function poll() {
  if (!key) {
    banner("Give an API key to see the cluster (shoal dev: .shoal-dev/keys/root.key).");
    return;
  }
  try {
    const c = await api("GET", "/v1/cluster");
    renderCluster(c);
    if (servedByNode) renderStats(await api("GET", "/v1/stats"));
    banner("");
  } catch (e) {
    banner(e.message);
  }
}

// Admin actions, through the admin routes (every node forwards them to the coordinators,
// which check the key's role): a new index generation on every shard of a collection,
// and a node drained or its drain undone. The outcome is shown in #action.
async function act(what, path, body, done) {
  const out = $("action");
  out.textContent = `${what}…`;
  try {
    out.textContent = `${what}: ${done(await api("POST", path, body))}`;
  } catch (e) {
    out.textContent = `${what} refused: ${e.message}`;
  }
  poll();
}

$("collections").addEventListener("click", (ev) => {
  const b = ev.target.closest("button.build");
  if (!b) return;
  const name = b.dataset.collection;
  act(`build of ${name}`, "/v1/admin/start-index-build", { collection: name },
    (op) => `operation ${op.id} ${op.state}` + (op.reason ? ` (${op.reason})` : ""));
});

$("nodes").addEventListener("click", (ev) => {
  const b = ev.target.closest("button.drain");
  if (!b) return;
  const undo = b.dataset.undo === "1";
  act(`${undo ? "undrain" : "drain"} of ${b.dataset.node}`, "/v1/admin/drain-node",
    { id: b.dataset.node, undo }, (n) => `node ${n.id} now ${String(n.state).replace("NODE_STATE_", "").toLowerCase()}`);
});

$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("shoal-key", key);
  $("key").value = "";
  poll();
});

$("search").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("results");
  out.replaceChildren();
  const body = { text: $("query").value, k: Number($("k").value) || 5, withText: true, withPayload: true };
  if ($("mode").value) body.mode = $("mode").value;
  try {
    const r = await api("POST", `/v1/collections/${encodeURIComponent($("collection").value)}/search`, body);
    const p = document.createElement("p");
    p.textContent = `${(r.hits || []).length} hits in ${Number(r.tookMs || 0).toFixed(1)} ms, ` +
      `${r.shardsAnswered || 0} of ${r.shardsTotal || 0} shards answered`;
    if (r.partial) p.className = "partial";
    const t = document.createElement("table");
    t.id = "hits";
    const head = t.createTHead().insertRow();
    for (const x of ["id", "score", "shard", "text"]) cell(head, x);
    const tb = t.createTBody();
    for (const h of r.hits || []) {
      const tr = tb.insertRow();
      cell(tr, h.id);
      cell(tr, Number(h.score || 0).toFixed(4));
      cell(tr, h.shard || 0);
      cell(tr, (h.text || "").slice(0, 160));
    }
    const shards = document.createElement("table");
    shards.id = "shard-answers";
    const sh = shards.createTHead().insertRow();
    for (const x of ["shard", "answered", "node", "generation", "plan / error"]) cell(sh, x);
    const sb = shards.createTBody();
    for (const a of r.shards || []) {
      const tr = sb.insertRow();
      cell(tr, a.shard || 0);
      cell(tr, a.answered ? "yes" : "no", a.answered ? "" : "state-down");
      cell(tr, a.node);
      cell(tr, a.generation || 0);
      cell(tr, a.error || a.plan || "");
    }
    out.append(p, t, shards);
  } catch (e) {
    out.textContent = e.message;
  }
});

poll();
setInterval(poll, POLL_MS);
