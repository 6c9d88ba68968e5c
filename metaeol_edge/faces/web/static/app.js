// The page of `metaeol serve`: one more client of its API, same origin, same key.
// Every string that comes from the server (documents, paths, model names, errors) is put in the page
// as text (textContent, text nodes): never as markup.

const KEY_STORE = "metaeol-edge.api-key";
const $ = (id) => document.getElementById(id);

// -- small DOM helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function say(id, text, isError = false) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", isError);
}

// -- the API, with the key when the server asks for one ------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let asking = null; // one key form at a time, however many requests were refused

function askKey(refused) {
  if (asking) return asking;
  const dialog = $("key-dialog");
  const input = $("key-input");
  $("key-why").textContent = refused
    ? "The key was refused. Give the right one: it is kept in this tab only (sessionStorage)."
    : "This server asks for a key. It is kept in this tab only (sessionStorage) and sent as an Authorization header.";
  input.value = "";
  asking = new Promise((resolve) => {
    const done = (key) => {
      $("key-form").removeEventListener("submit", onSubmit);
      $("key-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      asking = null;
      resolve(key);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      done(key);
    };
    const onCancel = (event) => {
      event.preventDefault();
      done(null);
    };
    $("key-form").addEventListener("submit", onSubmit);
    $("key-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
  return asking;
}

async function api(path, { method = "GET", body, text = false } = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = {};
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    if (response.status === 401 && attempt < 3) {
      if (key) sessionStorage.removeItem(KEY_STORE);
      const given = await askKey(Boolean(key));
      if (given === null) throw new ApiError(401, "this server needs an API key");
      continue;
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const data = await response.json();
        if (data && data.error && typeof data.error.message === "string") message = data.error.message;
      } catch {
        // not JSON: the status line says enough
      }
      throw new ApiError(response.status, message);
    }
    return text ? response.text() : response.json();
  }
}

// -- tabs: buttons with aria, arrow keys between them, the view in the URL's fragment --------------

const VIEWS = ["search", "compare", "map", "status"];
const opened = new Set();

function show(view, focus = false) {
  if (!VIEWS.includes(view)) view = "search";
  for (const name of VIEWS) {
    const tab = $(`tab-${name}`);
    const selected = name === view;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`view-${name}`).hidden = !selected;
  }
  if (focus) $(`tab-${view}`).focus();
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  document.body.dataset.view = view;
  if (!opened.has(view)) {
    opened.add(view);
    ONOPEN[view]();
  }
  statusTimer(view === "status");
}

function setupTabs() {
  const list = $("tabs");
  list.addEventListener("click", (event) => {
    const tab = event.target.closest("[role=tab]");
    if (tab) show(tab.id.slice(4));
  });
  list.addEventListener("keydown", (event) => {
    const i = VIEWS.indexOf(document.body.dataset.view);
    const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: VIEWS.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    show(VIEWS[(moves[event.key] + VIEWS.length) % VIEWS.length], true);
  });
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  // "/" jumps to the search box, as on many sites, unless the user is typing somewhere.
  document.addEventListener("keydown", (event) => {
    const typing = event.target.closest("input, textarea, select, [contenteditable]");
    if (event.key === "/" && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
      event.preventDefault();
      show("search");
      $("search-query").focus();
    }
  });
}

// -- collections, shared by Search and Map ---------------------------------------------------------

let collections = null; // a promise of the list, or of null where the server has no search routes

function loadCollections() {
  collections ??= api("/v1/collections")
    .then((answer) => answer.data || [])
    .catch((err) => {
      collections = null; // ask again next time (a key given later, a server restarted)
      if (err.status === 404) return [];
      throw err;
    });
  return collections;
}

function fillCollections(select, list) {
  select.replaceChildren(
    ...list.map((c) => el("option", { value: c.name, text: `${c.name} (${c.chunks} chunks, ${c.files} files)` })),
  );
  select.disabled = list.length === 0;
}

const NO_COLLECTION =
  "This server serves no collection. Make one with `metaeol index NAME FOLDER`, then start the server " +
  "with `metaeol serve --collection NAME`. Compare and Status work without one.";

// -- Search ----------------------------------------------------------------------------------------

// Words too common to be worth marking (the search itself is by meaning, not by these words).
const COMMON = new Set("a an and are as at be by for from in is it of on or that the this to was with".split(" "));

// The query's words, for marking: letters and digits, two or more, not COMMON, without duplicates.
function queryWords(query) {
  const words = (query.toLowerCase().match(/[\p{L}\p{N}]{2,}/gu) || []).filter((w) => !COMMON.has(w));
  return [...new Set(words)].sort((a, b) => b.length - a.length);
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

// The text as nodes, each of the query's words in a <mark>: built from text nodes, never markup.
function marked(text, words) {
  const out = document.createDocumentFragment();
  if (!words.length) {
    out.append(text);
    return out;
  }
  // Whole words only: "on" is not marked inside "Bonds".
  const pattern = new RegExp(`(?<![\\p{L}\\p{N}])(${words.map(escapeRegExp).join("|")})(?![\\p{L}\\p{N}])`, "giu");
  text.split(pattern).forEach((part, i) => {
    if (!part) return;
    if (i % 2 === 1) out.append(el("mark", { text: part }));
    else out.append(document.createTextNode(part));
  });
  return out;
}

function where(hit) {
  const end = hit.line_end && hit.line_end !== hit.line ? `-${hit.line_end}` : "";
  return `${hit.path}:${hit.line}${end}`;
}

function resultItem(hit, words, onNeighbours) {
  const head = el(
    "div",
    { class: "hit-head" },
    el("span", { class: "score", text: Number(hit.score).toFixed(3), title: "cosine similarity" }),
    el("code", { class: "where", text: where(hit) }),
  );
  if (onNeighbours) {
    const more = el("button", { type: "button", class: "small", text: "Similar chunks" });
    more.setAttribute("aria-label", `Chunks similar to ${where(hit)}`);
    more.addEventListener("click", () => onNeighbours(hit));
    head.append(more);
  }
  return el("li", { class: "hit", "data-rank": String(hit.rank) }, head, el("pre", { class: "chunk" }, marked(hit.text, words)));
}

async function runSearch(body, words) {
  const list = $("search-results");
  say("search-note", "Searching…");
  $("search-go").disabled = true;
  performance.mark("metaeol:submit"); // user timing marks, read by benchmarks/page.py
  const t0 = performance.now();
  try {
    const answer = await api("/v1/search", { method: "POST", body });
    const ms = performance.now() - t0;
    list.replaceChildren(...answer.data.map((hit) => resultItem(hit, words, neighboursOf)));
    performance.mark("metaeol:results");
    const what = body.query !== undefined ? `“${body.query}”` : `chunks like ${body.to.path}:${body.to.line}`;
    say("search-note", `${answer.data.length} results for ${what} in ${answer.collection} (${ms.toFixed(0)} ms).`);
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
  } catch (err) {
    list.replaceChildren();
    say("search-note", `Search failed: ${err.message}`, true);
  } finally {
    $("search-go").disabled = false;
  }
}

function neighboursOf(hit) {
  const collection = $("search-collection").value;
  runSearch({ collection, to: { path: hit.path, line: hit.line }, k: Number($("search-k").value) }, []);
}

async function openSearch() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = $("search-query").value.trim();
    const collection = $("search-collection").value;
    if (!query || !collection) return;
    runSearch({ collection, query, k: Number($("search-k").value) }, queryWords(query));
  });
  try {
    const list = await loadCollections();
    fillCollections($("search-collection"), list);
    fillCollections($("map-collection"), list);
    if (!list.length) say("search-note", NO_COLLECTION);
    $("search-query").disabled = !list.length;
    $("search-go").disabled = !list.length;
    performance.mark("metaeol:ready");
  } catch (err) {
    say("search-note", `Cannot list the collections: ${err.message}`, true);
  }
}

// -- Compare ---------------------------------------------------------------------------------------

async function fillModels(select) {
  const answer = await api("/v1/models");
  select.replaceChildren(...answer.data.map((m) => el("option", { value: m.id, text: m.id })));
}

function cosineMatrix(vectors) {
  const units = vectors.map((v) => {
    let norm = 0;
    for (const x of v) norm += x * x;
    norm = Math.sqrt(norm) || 1;
    return v.map((x) => x / norm);
  });
  return units.map((a) =>
    units.map((b) => {
      let dot = 0;
      for (let i = 0; i < a.length; i++) dot += a[i] * b[i];
      return dot;
    }),
  );
}

// A colour for a cosine in [-1, 1]: white at 0, blue below, red above; the text black or white,
// whichever keeps a contrast of at least 4.5:1 on it (WCAG AA: black from a luminance of 0.175, white to 0.183).
function heat(value) {
  const t = Math.max(-1, Math.min(1, value));
  const end = t >= 0 ? [180, 50, 10] : [20, 70, 170];
  const rgb = end.map((c) => Math.round(255 + (c - 255) * Math.abs(t)));
  const lin = rgb.map((c) => (c / 255 <= 0.04045 ? c / 255 / 12.92 : ((c / 255 + 0.055) / 1.055) ** 2.4));
  const luminance = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
  return { background: `rgb(${rgb.join(", ")})`, dark: luminance < 0.179 };
}

function matrixTable(sentences, sims) {
  const n = sentences.length;
  const table = el("table", { class: "heat", id: "compare-matrix" });
  table.append(el("caption", { text: "Cosine similarity" }));
  const headRow = el("tr", {}, el("th", { scope: "col", text: "" }));
  for (let j = 0; j < n; j++) headRow.append(el("th", { scope: "col", text: String(j + 1), title: sentences[j] }));
  table.append(el("thead", {}, headRow));
  const body = el("tbody");
  for (let i = 0; i < n; i++) {
    const row = el("tr", {}, el("th", { scope: "row", text: String(i + 1), title: sentences[i] }));
    for (let j = 0; j < n; j++) {
      const value = sims[i][j];
      const cell = el("td", { text: value.toFixed(2), "data-value": String(value), title: `${i + 1} vs ${j + 1}` });
      const colour = heat(value);
      cell.style.backgroundColor = colour.background;
      if (colour.dark) cell.classList.add("dark");
      row.append(cell);
    }
    body.append(row);
  }
  table.append(body);
  return table;
}

function pairsSummary(sentences, sims) {
  let best = null;
  let worst = null;
  for (let i = 0; i < sentences.length; i++) {
    for (let j = i + 1; j < sentences.length; j++) {
      if (!best || sims[i][j] > best[2]) best = [i, j, sims[i][j]];
      if (!worst || sims[i][j] < worst[2]) worst = [i, j, sims[i][j]];
    }
  }
  const pair = ([i, j, v]) => `${i + 1} and ${j + 1} (${v.toFixed(2)})`;
  return `Most alike: ${pair(best)}. Least alike: ${pair(worst)}.`;
}

async function compare() {
  const sentences = $("compare-input")
    .value.split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
  if (sentences.length < 2 || sentences.length > 20) {
    say("compare-note", `Give 2 to 20 sentences, one per line (there are ${sentences.length}).`, true);
    return;
  }
  say("compare-note", "Embedding…");
  $("compare-go").disabled = true;
  try {
    const body = { input: sentences };
    if ($("compare-model").value) body.model = $("compare-model").value;
    const answer = await api("/v1/embeddings", { method: "POST", body });
    const vectors = answer.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    const sims = cosineMatrix(vectors);
    const legend = el("ol", { class: "sentences" }, ...sentences.map((s) => el("li", { text: s })));
    $("compare-out").replaceChildren(matrixTable(sentences, sims), legend);
    say("compare-note", `${answer.model}, ${vectors[0].length} dimensions. ${pairsSummary(sentences, sims)}`);
  } catch (err) {
    $("compare-out").replaceChildren();
    say("compare-note", `Compare failed: ${err.message}`, true);
  } finally {
    $("compare-go").disabled = false;
  }
}

async function openCompare() {
  $("compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    compare();
  });
  try {
    await fillModels($("compare-model"));
  } catch (err) {
    say("compare-note", `Cannot list the models: ${err.message}`, true);
  }
}

// -- Map -------------------------------------------------------------------------------------------

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#e07000", "#17becf", "#8c564b", "#e377c2", "#7f7f00"];
const OTHER = "#9a9a9a";
let mapPoints = [];

let mapRoot = ""; // the folder every point's path starts with, left out of the colours' names

function commonFolder(paths) {
  if (!paths.length) return "";
  let prefix = paths[0].slice(0, paths[0].lastIndexOf("/") + 1);
  for (const path of paths) {
    while (prefix && !path.startsWith(prefix)) prefix = prefix.slice(0, prefix.slice(0, -1).lastIndexOf("/") + 1);
  }
  return prefix;
}

function groupOf(point, by) {
  const path = point.path.slice(mapRoot.length);
  if (by === "file") return path;
  const cut = path.lastIndexOf("/");
  return cut < 0 ? "." : path.slice(0, cut);
}

function drawMap() {
  const by = $("map-colour").value;
  const counts = new Map();
  for (const p of mapPoints) counts.set(groupOf(p, by), (counts.get(groupOf(p, by)) || 0) + 1);
  const ranked = [...counts.entries()].sort((a, b) => b[1] - a[1]);
  const colours = new Map(ranked.slice(0, PALETTE.length).map(([name], i) => [name, PALETTE[i]]));
  const legend = ranked.slice(0, PALETTE.length).map(([name, count]) => {
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.backgroundColor = colours.get(name);
    return el("li", {}, swatch, el("span", { text: `${name} (${count})` }));
  });
  const rest = ranked.slice(PALETTE.length);
  if (rest.length) {
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.backgroundColor = OTHER;
    const n = rest.reduce((sum, [, count]) => sum + count, 0);
    legend.push(el("li", {}, swatch, el("span", { text: `${rest.length} other ${by === "file" ? "files" : "folders"} (${n})` })));
  }
  $("map-legend").replaceChildren(...legend);
  $("map-root").textContent = mapRoot ? `in ${mapRoot}` : "";

  const size = 600;
  const pad = 12;
  const xs = mapPoints.map((p) => p.x);
  const ys = mapPoints.map((p) => p.y);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (size - 2 * pad);
  const sy = (y) => size - pad - ((y - y0) / (y1 - y0 || 1)) * (size - 2 * pad);
  const plot = svg("svg", { viewBox: `0 0 ${size} ${size}`, role: "img", id: "map-svg", class: "map" });
  plot.setAttribute("aria-label", `${mapPoints.length} chunks placed by meaning; the Colours list and Search give the same content as text`);
  const r = mapPoints.length > 3000 ? 2 : mapPoints.length > 500 ? 3 : 4.5;
  const group = svg("g");
  mapPoints.forEach((p, i) => {
    const dot = svg("circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r, fill: colours.get(groupOf(p, by)) || OTHER });
    dot.dataset.i = String(i);
    group.append(dot);
  });
  plot.append(group);
  $("map-plot").replaceChildren(plot);
}

function mapTip(event) {
  const tip = $("map-tip");
  const i = event.target.dataset ? event.target.dataset.i : undefined;
  if (i === undefined) {
    tip.hidden = true;
    return;
  }
  const p = mapPoints[Number(i)];
  const text = p.text.length > 300 ? `${p.text.slice(0, 300)}…` : p.text;
  tip.replaceChildren(el("code", { text: `${p.path}:${p.line}` }), el("div", { text }));
  const box = $("map-plot").getBoundingClientRect();
  tip.style.left = `${Math.min(event.clientX - box.left + 14, box.width - 260)}px`;
  tip.style.top = `${event.clientY - box.top + 14}px`;
  tip.hidden = false;
}

async function mapNeighbours(event) {
  const i = event.target.dataset ? event.target.dataset.i : undefined;
  if (i === undefined) return;
  const p = mapPoints[Number(i)];
  for (const dot of $("map-plot").querySelectorAll("circle.picked")) dot.classList.remove("picked");
  event.target.classList.add("picked");
  say("map-picked", `Nearest to ${p.path}:${p.line}:`);
  try {
    const answer = await api("/v1/search", {
      method: "POST",
      body: { collection: $("map-collection").value, to: { path: p.path, line: p.line }, k: 10 },
    });
    $("map-neighbours").replaceChildren(...answer.data.map((hit) => resultItem(hit, [], null)));
  } catch (err) {
    $("map-neighbours").replaceChildren();
    say("map-picked", `Cannot list the neighbours: ${err.message}`, true);
  }
}

async function loadMap() {
  const name = $("map-collection").value;
  if (!name) return;
  say("map-note", "Projecting…");
  try {
    const answer = await api(`/v1/collections/${encodeURIComponent(name)}/map?limit=10000`);
    mapPoints = answer.points;
    mapRoot = commonFolder(mapPoints.map((p) => p.path));
    const sampled = answer.sampled
      ? `A sample of ${answer.points.length} of its ${answer.total} chunks is shown.`
      : `All ${answer.total} chunks are shown.`;
    say("map-note", `${answer.collection}: ${sampled} Nearby points have similar meaning (a PCA projection).`);
    document.body.dataset.mapPoints = String(mapPoints.length);
    drawMap();
  } catch (err) {
    say("map-note", `Cannot draw the map: ${err.message}`, true);
  }
}

async function openMap() {
  $("map-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadMap();
  });
  $("map-colour").addEventListener("change", () => mapPoints.length && drawMap());
  const plot = $("map-plot");
  plot.addEventListener("mouseover", mapTip);
  plot.addEventListener("mouseleave", () => ($("map-tip").hidden = true));
  plot.addEventListener("click", mapNeighbours);
  try {
    const list = await loadCollections();
    fillCollections($("map-collection"), list);
    $("map-go").disabled = !list.length;
    if (!list.length) say("map-note", NO_COLLECTION);
    else loadMap();
  } catch (err) {
    say("map-note", `Cannot list the collections: ${err.message}`, true);
  }
}

// -- Status: /v1/status for the configuration, /metrics for the counters ---------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function metric(samples, name, model) {
  return samples
    .filter((s) => s.name === name && (model === undefined || s.labels.model === model))
    .reduce((sum, s) => sum + s.value, 0);
}

let previous = null; // {t, sentences: {model: n}} of the last refresh, for sentences per second
let timer = null;

function statusTimer(on) {
  if (timer) clearInterval(timer);
  timer = on && $("status-auto").checked ? setInterval(refreshStatus, 2000) : null;
}

function dlRow(dl, term, value, key) {
  dl.append(el("dt", { text: term }), el("dd", { text: value, "data-key": key }));
}

async function refreshStatus() {
  try {
    const [metricsText, status] = await Promise.all([
      api("/metrics", { text: true }),
      api("/v1/status").catch((err) => {
        if (err.status === 404) return null;
        throw err;
      }),
    ]);
    const samples = parseMetrics(metricsText);
    const now = performance.now();
    const models = status ? status.models : (await api("/v1/models")).data.map((m) => ({ id: m.id }));
    const summary = $("status-summary");
    summary.replaceChildren();
    if (status) dlRow(summary, "Version", status.version, "version");
    if (status) dlRow(summary, "Up for", `${Math.round(status.uptime_s)} s`, "uptime");
    dlRow(summary, "Requests answered", String(metric(samples, "metaeol_requests_total")), "requests");

    const table = el("table", { class: "models", id: "status-table" });
    table.append(el("caption", { text: "Served models" }));
    const cols = [
      ["Model", (m) => m.id],
      ["Preset", (m) => m.preset ?? "none (the paper's)"],
      ["Templates", (m) => (m.templates === undefined ? "" : `${m.templates} (${m.n_templates})`)],
      ["Method", (m) => m.method ?? ""],
      ["Layer", (m) => (m.layer === undefined ? "" : Array.isArray(m.layer) ? `${m.layer.join(" + ")}, averaged` : m.layer === -1 ? "final (-1)" : String(m.layer))],
      ["Dim", (m) => String(m.dim ?? "")],
      ["Level", (m) => m.level ?? ""],
      ["Sentences", (m) => String(metric(samples, "metaeol_sentences_total", m.id))],
      ["Sentences/s", (m) => rate(m.id, metric(samples, "metaeol_sentences_total", m.id), now)],
      ["Cache hit rate", (m) => hitRate(samples, m.id)],
      ["Queue", (m) => String(metric(samples, "metaeol_queue_depth", m.id))],
    ];
    table.append(el("thead", {}, el("tr", {}, ...cols.map(([name]) => el("th", { scope: "col", text: name })))));
    table.append(
      el(
        "tbody",
        {},
        ...models.map((m) =>
          el("tr", { "data-model": m.id }, ...cols.map(([name, get]) => el("td", { text: get(m), "data-col": name }))),
        ),
      ),
    );
    $("status-models").replaceChildren(table);
    previous = { t: now, sentences: Object.fromEntries(models.map((m) => [m.id, metric(samples, "metaeol_sentences_total", m.id)])) };
    say("status-note", `Updated ${new Date().toLocaleTimeString()}, from /metrics and /v1/status.`);
  } catch (err) {
    say("status-note", `Cannot read the status: ${err.message}`, true);
    statusTimer(false);
  }
}

function rate(model, sentences, now) {
  if (!previous || !(model in previous.sentences)) return "—";
  const seconds = (now - previous.t) / 1000;
  return seconds > 0 ? ((sentences - previous.sentences[model]) / seconds).toFixed(1) : "—";
}

function hitRate(samples, model) {
  const hits = metric(samples, "metaeol_cache_hits_total", model);
  const misses = metric(samples, "metaeol_cache_misses_total", model);
  return hits + misses ? `${((100 * hits) / (hits + misses)).toFixed(1)}% of ${hits + misses}` : "—";
}

function openStatus() {
  $("status-refresh").addEventListener("click", refreshStatus);
  $("status-auto").addEventListener("change", () => statusTimer(true));
  refreshStatus();
}

const ONOPEN = { search: openSearch, compare: openCompare, map: openMap, status: openStatus };

setupTabs();
show(location.hash.slice(1) || "search");
document.body.dataset.ready = "1";
