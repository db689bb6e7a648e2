// lightning-dualform view: the page. Plain JavaScript, no libraries, nothing loaded from elsewhere.
// Every number comes from the server's JSON API (see cli/view.py); /api/attend answers exactly what
// `lightning-dualform attend --json` writes.
"use strict";

const $ = (id) => document.getElementById(id);
// topK, contribution and score start at the server's defaults (/api/info "defaults": the command line's)
const state = {
  split: null, index: null, upload: null, uploadName: "", uploadRows: 0, uploadRow: 0,
  layer: "", topK: null, by: "pattern", contribution: null, score: null, atStep: null, method: null,
};
let info = null;
let queries = null; // {index, label, prediction} of the current split
const images = new Map(); // "train:<index>" | "split:<split>:<index>" | "upload:<id>:<row>" -> image or null
let ticket = 0; // answers to older requests are dropped

// ------------------------------------------------------------------------------------------------
// talking to the server
// ------------------------------------------------------------------------------------------------
async function api(path, params = {}, init = undefined) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") qs.set(k, String(v));
  const url = path + (qs.toString() ? "?" + qs.toString() : "");
  const res = await fetch(url, init);
  let body;
  try { body = await res.json(); } catch (e) { throw new Error(`${path}: HTTP ${res.status}`); }
  if (!res.ok) throw new Error(body && body.error ? body.error : `${path}: HTTP ${res.status}`);
  return body;
}

function showError(msg) {
  const el = $("error");
  if (msg) { el.textContent = msg; el.hidden = false; } else { el.textContent = ""; el.hidden = true; }
}

// ------------------------------------------------------------------------------------------------
// small drawing helpers
// ------------------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawImage(canvas, img) {
  // 1 channel: dark ink on white (like the PNGs' gray_r); 3 channels: as they are
  canvas.width = img.w; canvas.height = img.h;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(img.w, img.h);
  const px = img.pixels;
  for (let i = 0, n = img.w * img.h; i < n; i++) {
    let r, g, b;
    if (img.c === 1) { r = g = b = 255 - px[i]; } else { r = px[3 * i]; g = px[3 * i + 1]; b = px[3 * i + 2]; }
    data.data[4 * i] = r; data.data[4 * i + 1] = g; data.data[4 * i + 2] = b; data.data[4 * i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
}

const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toPrecision(d);
const sci = (x) => (x === null || x === undefined) ? "–" : Number(x).toExponential(1);
const signed = (x) => (x >= 0 ? "+" : "") + Number(x).toPrecision(3);
const pct = (x) => (x >= 0 ? "+" : "") + (100 * x).toFixed(0) + "%";

// ------------------------------------------------------------------------------------------------
// state <-> URL hash (a view can be linked to, and reloads where it was)
// ------------------------------------------------------------------------------------------------
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get("split")) state.split = h.get("split");
  if (h.get("index")) state.index = h.get("index");
  if (h.has("layer")) state.layer = h.get("layer");
  if (h.get("top_k")) state.topK = Math.max(1, parseInt(h.get("top_k"), 10) || info.defaults.top_k);
  if (h.get("by")) state.by = h.get("by");
  if (h.get("contribution_to")) state.contribution = h.get("contribution_to") === "pred" ? "auto" : h.get("contribution_to");
  if (h.get("score")) state.score = h.get("score");
  if (h.get("at_step")) state.atStep = parseInt(h.get("at_step"), 10);
  if (h.get("method")) state.method = h.get("method");
}

function writeHash() {
  const h = new URLSearchParams();
  if (!state.upload) { h.set("split", state.split); if (state.index !== null) h.set("index", state.index); }
  if (state.layer) h.set("layer", state.layer);
  h.set("top_k", state.topK);
  h.set("by", state.by);
  h.set("contribution_to", state.contribution);
  h.set("score", state.score);
  if (state.atStep !== null) h.set("at_step", state.atStep);
  h.set("method", state.method);
  history.replaceState(null, "", "#" + h.toString());
}

// ------------------------------------------------------------------------------------------------
// controls
// ------------------------------------------------------------------------------------------------
function epochOf(step) {
  // the model after `step` optimizer steps was last updated by step - 1
  let e = info.epochs.length ? info.epochs[0] : 0;
  info.epoch_starts.forEach((s, i) => { if (s <= step - 1) e = info.epochs[i]; });
  return e;
}

function stepLabel(v) {
  const end = v === info.last_step;
  return `after ${v} steps (epoch ${epochOf(v)})` + (end ? " · the trained model" : "");
}

function fillIndexSelect() {
  const sel = $("index");
  sel.textContent = "";
  if (state.upload) {
    for (let r = 0; r < state.uploadRows; r++) sel.append(new Option(`row ${r} of ${state.uploadName}`, String(r)));
    sel.value = String(state.uploadRow);
    return;
  }
  const wrongOnly = $("wrong-only").checked;
  let kept = 0;
  queries.index.forEach((ix, p) => {
    const lab = queries.label[p], pred = queries.prediction[p];
    const wrong = lab >= 0 && pred >= 0 && lab !== pred;
    if (wrongOnly && !wrong) return;
    const text = `#${ix}` + (lab >= 0 ? ` · label ${lab}` : "") + (pred >= 0 ? ` · pred ${pred}` : "") + (wrong ? " ✗" : "");
    sel.append(new Option(text, String(ix)));
    kept++;
  });
  if (!kept) sel.append(new Option("(none)", ""));
  const values = Array.from(sel.options).map((o) => o.value);
  if (state.index === null || !values.includes(String(state.index))) state.index = values[0] || null;
  sel.value = state.index === null ? "" : String(state.index);
}

async function loadSplit(split) {
  state.split = split;
  queries = await api("/api/queries", { split });
  fillIndexSelect();
}

function step(delta) {
  const sel = $("index");
  const i = sel.selectedIndex + delta;
  if (i < 0 || i >= sel.options.length) return;
  sel.selectedIndex = i;
  sel.dispatchEvent(new Event("change"));
}

function bindControls() {
  $("split").addEventListener("change", async (ev) => {
    const v = ev.target.value;
    if (v.startsWith("upload:")) return;
    state.upload = null;
    Array.from($("split").options).filter((o) => o.value.startsWith("upload:")).forEach((o) => o.remove());
    $("upload-name").textContent = "";
    state.index = null;
    await loadSplit(v);
    refresh();
  });
  $("index").addEventListener("change", (ev) => {
    if (state.upload) state.uploadRow = parseInt(ev.target.value, 10) || 0; else state.index = ev.target.value || null;
    refresh();
  });
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(+1));
  $("wrong-only").addEventListener("change", () => { if (!state.upload) { fillIndexSelect(); refresh(); } });
  $("layer").addEventListener("change", (ev) => { state.layer = ev.target.value; refresh(); });
  $("top-k").addEventListener("change", (ev) => {
    state.topK = Math.max(1, Math.min(50, parseInt(ev.target.value, 10) || info.defaults.top_k));
    ev.target.value = state.topK;
    refresh();
  });
  $("by").addEventListener("change", (ev) => { state.by = ev.target.value; refresh(); });
  $("contribution").addEventListener("change", (ev) => { state.contribution = ev.target.value; refresh(); });
  $("score").addEventListener("change", (ev) => { state.score = ev.target.value; refresh(); });
  $("method").addEventListener("change", (ev) => { state.method = ev.target.value; refresh(); });
  const slider = $("at-step");
  let timer = null;
  slider.addEventListener("input", () => {
    const v = parseInt(slider.value, 10);
    $("at-step-value").textContent = stepLabel(v);
    state.atStep = v === info.last_step ? null : v;
    clearTimeout(timer);
    timer = setTimeout(refresh, 120);
  });
  $("at-end").addEventListener("click", () => {
    slider.value = info.last_step;
    slider.dispatchEvent(new Event("input"));
  });
  $("upload").addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    ev.target.value = "";
    if (!file) return;
    try {
      const name = file.name.replace(/[^\w .()+-]/g, "_").slice(0, 120) || "upload.npy";
      const body = await file.arrayBuffer();
      const up = await api("/api/upload", { name }, { method: "POST", body, headers: { "Content-Type": "application/octet-stream" } });
      state.upload = up.upload; state.uploadName = up.name; state.uploadRows = up.n; state.uploadRow = 0;
      if (state.layer && !up.layers.includes(state.layer)) state.layer = "";
      $("layer").value = state.layer;
      const opt = new Option(`uploaded: ${up.name}`, "upload:" + up.upload);
      Array.from($("split").options).filter((o) => o.value.startsWith("upload:")).forEach((o) => o.remove());
      $("split").append(opt);
      $("split").value = opt.value;
      $("upload-name").textContent = `${up.n} row(s) of width ${up.d}: layers ${up.layers.join(", ")}`;
      fillIndexSelect();
      refresh();
    } catch (e) {
      showError(e.message);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// one answer
// ------------------------------------------------------------------------------------------------
async function ensureImages(keys) {
  // keys: "train:<i>"; fetched in pieces of at most 256
  const missing = keys.filter((k) => !images.has(k)).map((k) => k.slice(6));
  for (let i = 0; i < missing.length; i += 256) {
    const part = missing.slice(i, i + 256);
    const got = await api("/api/images", { train: part.join(",") });
    got.train.forEach((ix, j) => images.set("train:" + ix, got.images[j]));
  }
}

async function queryImage() {
  if (!info.splits.length && !state.upload) return null;
  if (state.upload) {
    const key = `upload:${state.upload}:${state.uploadRow}`;
    if (!images.has(key)) {
      const got = await api("/api/images", { upload: state.upload });
      got.images.forEach((img, r) => images.set(`upload:${state.upload}:${r}`, img));
    }
    return images.get(key) || null;
  }
  const key = `split:${state.split}:${state.index}`;
  if (!images.has(key)) {
    const got = await api("/api/images", { split: state.split, index: state.index });
    images.set(key, got.images[0]);
  }
  return images.get(key);
}

function attendParams() {
  const p = { top_k: state.topK, by: state.by, contribution_to: state.contribution, score: state.score };
  if (state.layer) p.layer = state.layer;
  if (state.atStep !== null) p.at_step = state.atStep;
  if (state.upload) p.upload = state.upload; else { p.split = state.split; p.index = state.index; }
  return p;
}

async function refresh() {
  if (!state.upload && (state.index === null || state.index === "")) return;
  writeHash();
  const mine = ++ticket;
  document.body.classList.add("busy");
  const t0 = performance.now();
  try {
    const res = await api("/api/attend", attendParams());
    // an influence that cannot answer (a replay refused, say) leaves its reason in the card, not the attention
    const influence = await influenceAnswer(res).catch((e) => ({ method: null, note: e.message, queries: [] }));
    const t1 = performance.now();
    if (mine !== ticket) return;
    const j = state.upload ? state.uploadRow : 0;
    const shown = [];
    const iq = influence && influence.queries ? influence.queries[j] : null;
    if (iq) for (const side of ["proponents", "opponents"]) iq[side].forEach((it) => shown.push("train:" + it.index));
    for (const name of Object.keys(res.layers)) {
      const r = res.query_rows[name].example.indexOf(j);
      if (r < 0) continue;
      for (const list of rankings(res.layers[name], r)) list.items.forEach((it) => shown.push("train:" + it.index));
    }
    if (info.train_inputs) await ensureImages(Array.from(new Set(shown)));
    const qimg = await queryImage();
    if (mine !== ticket) return;
    render(res, j, qimg, influence);
    showError("");
    $("timing").textContent = `answer in ${(t1 - t0).toFixed(0)} ms, drawn in ${(performance.now() - t1).toFixed(0)} ms`;
    api("/api/cache").then((c) => { $("cache-line").textContent = c.cache_text ? "cache: " + c.cache_text : "no cache"; }).catch(() => {});
  } catch (e) {
    if (mine === ticket) showError(e.message);
  } finally {
    if (mine === ticket) document.body.classList.remove("busy");
  }
}

// The influence answer for the chosen method: the store-only first order comes with /api/attend; the others
// (every layer, TracIn, the metagradient: the viewer needs --model) from /api/influence.
async function influenceAnswer(res) {
  const [method, layers] = (state.method || "first_order:output").split(":");
  if (method === "first_order" && layers === "output") return res.influence;
  const p = { method, layers, top_k: state.topK };
  if (state.upload) p.upload = state.upload; else { p.split = state.split; p.index = state.index; }
  return api("/api/influence", p);
}

// The influence card: the examples whose up-weighting raises (proponents) or lowers (opponents) the prediction's
// margin the most, each number labelled with what it is.
function influenceCard(inf, j, reference) {
  const card = el("section", "influence-card");
  card.dataset.kind = "influence";
  const h = el("h2", null, "Which training examples ");
  h.append(el("span", "muted", inf && inf.method ? inf.label : "influence not available"));
  card.append(h);
  const q = inf && inf.queries ? inf.queries[j] : null;
  if (!q) {
    card.append(el("div", "cert", inf && inf.note ? inf.note : "no influence for this query"));
    return card;
  }
  const sym = ["margin", "loss", "logit"].includes(inf.target) ? `d${inf.target}/dw` : "df/dw";
  const line = el("div", "cert");
  line.append(`${inf.target}` + (q.class === null || q.class === undefined ? "" : ` of class ${q.class}`) + " = ");
  line.append(el("b", null, signed(q.value)));
  line.append(` · ${inf.n_examples.toLocaleString()} training examples scored · ${sym} per example`);
  if (inf.replay) line.append(` · replay: gradients within ${sci(inf.replay.grad_error)} of the stored ones`);
  card.append(line);
  if (inf.note) card.append(el("div", "muted", inf.note));
  const left = el("div", "rankings");
  for (const [side, kind, what] of [["proponents", "pro", "up-weighting raises the margin"],
                                     ["opponents", "con", "up-weighting lowers the margin"]]) {
    const sec = el("div", "ranking");
    sec.dataset.kind = "influence-" + kind;
    sec.append(el("h3", null, `${side}: ${what} the most (${sym})`));
    const thumbs = el("div", "thumbs");
    if (!q[side].length) thumbs.append(el("span", "muted", "none"));
    for (const it of q[side]) thumbs.append(thumb({ ...it, sub: "training example" }, kind, sym, reference));
    sec.append(thumbs);
    left.append(sec);
  }
  card.append(left);
  return card;
}

// What a result's numbers are, by its `score` ("raw" | "unit"): every heading and number says which.
function scoreNames(res, r) {
  const unit = res.units ? res.units[r] : null;
  if (res.score === "unit") {
    return { what: `attention weight for unit ${unit}`, formula: `−(Q_s[${unit}] ⊙ k)·q`, short: "weight" };
  }
  return { what: "similarity", formula: "k·q", short: "k·q" };
}

function rankings(res, r) {
  // [{title, kind: "top" | "pro" | "con", label, items: [{index, label, score, sub}]}]; label: what the numbers are
  const byExample = state.by === "example";
  const lists = [];
  const rows = (t, pad) => {
    if (!t) return [];
    const out = [];
    for (let i = 0; i < t.score[r].length; i++) {
      const ix = t.index[r][i];
      if ((pad === "row" ? t.row[r][i] : ix) < 0) continue;
      out.push({ index: ix, label: t.label[r][i], score: t.score[r][i],
                 sub: byExample ? `${t.rows[r][i]} rows` : `ep ${t.epoch[r][i]} · step ${t.step[r][i]}` });
    }
    return out;
  };
  const pad = byExample ? "index" : "row";
  const what = byExample ? "training examples" : "training patterns";
  const s = scoreNames(res, r);
  const summed = byExample ? "summed over each example's rows" : "";
  lists.push({ title: `most attended ${what}, by ${s.what}, ${s.formula}${summed ? ", " + summed : ""}`, kind: "top",
               label: s.short, items: rows(byExample ? res.top_examples : res.top, pad) });
  if (res.units) {
    const unit = res.units[r];
    lists.push({ title: `proponents of output unit ${unit}: largest contribution to its output`, kind: "pro",
                 label: "contrib.", items: rows(byExample ? res.proponent_examples : res.proponents, pad) });
    lists.push({ title: `opponents of output unit ${unit}: most negative contribution to its output`, kind: "con",
                 label: "contrib.", items: rows(byExample ? res.opponent_examples : res.opponents, pad) });
  }
  return lists;
}

function render(res, j, qimg, influence) {
  // the query
  const q = res.queries;
  const label = q.label[j], pred = q.prediction[j];
  const wrong = label >= 0 && pred >= 0 && label !== pred;
  const title = $("query-title");
  title.textContent = state.upload ? `row ${j} of ${state.uploadName}` : `${state.split} #${q.index[j]}`;
  title.classList.toggle("wrong", wrong);
  const sub = [];
  if (label >= 0) sub.push(`label ${label}`);
  if (pred >= 0) sub.push(`predicted ${pred}` + (wrong ? " ✗" : " ✓"));
  $("query-sub").textContent = sub.join(" · ") || "no recorded label or prediction";
  const canvas = $("query-image");
  if (qimg) { drawImage(canvas, qimg); canvas.hidden = false; } else { canvas.hidden = true; }
  // the prediction a thumbnail is compared with: the recorded one, else the output layer's unit
  let reference = pred;

  const box = $("layers");
  box.textContent = "";
  box.append(influenceCard(influence, j, reference));
  box.append(el("p", "muted attention-note", "Attention, the paper's view: how each layer's output is assembled " +
    "from its training rows. Its weights are not a prediction of what removing or up-weighting an example would do."));
  const names = Object.keys(res.layers);
  for (const name of names) {
    const r = res.query_rows[name].example.indexOf(j);
    const lres = res.layers[name];
    if (r < 0) continue;
    if (reference < 0 && lres.units && (state.contribution === "auto" || state.contribution === "pred")) reference = lres.units[r];
    box.append(layerCard(name, lres, r, res.query_rows[name].example.filter((e) => e === j).length, reference));
  }
  if (!state.upload) box.append(studyCard());
}

// The paper authors' measures of this query (/api/study): per linear layer, over every stored row, the vote, the
// top 500 rows' labels and steps against rank, and how much of the query's total its top 1% of rows hold.
// A pass over the whole store per layer: computed when asked.
function studyCard() {
  const card = el("section", "study-card");
  card.dataset.kind = "study";
  card.append(el("h2", null, "The paper authors' measures "));
  const bar = el("div", "study-controls");
  const pick = el("select");
  pick.id = "study-score";
  for (const [v, t] of [["abs", "|k·q| (the authors')"], ["signed", "k·q (what the output sums)"]]) {
    const o = el("option", null, t);
    o.value = v;
    pick.append(o);
  }
  const go = el("button", null, "compute");
  go.type = "button";
  go.id = "study-go";
  const out = el("div", "study-out");
  go.addEventListener("click", async () => {
    out.textContent = "scoring every stored row…";
    try {
      const res = await api("/api/study", { split: state.split, index: state.index, score: pick.value });
      out.textContent = "";
      out.append(studyTable(res));
      for (const [name, m] of Object.entries(res.layers)) out.append(rankPlot(name, m, res));
    } catch (e) {
      out.textContent = e.message;
    }
  });
  bar.append("score ", pick, " ", go);
  card.append(bar, out);
  return card;
}

function studyTable(res) {
  const t = el("table", "study-table");
  const head = el("tr");
  for (const h of ["layer", "vote (largest class total)", "top 500 with the label", "top 1% of rows hold", "rows"]) head.append(el("th", null, h));
  t.append(head);
  for (const [name, m] of Object.entries(res.layers)) {
    const tr = el("tr");
    tr.append(el("td", null, name));
    tr.append(el("td", res.label >= 0 && m.vote !== res.label ? "bad" : null, String(m.vote)));
    tr.append(el("td", null, m.top_label_share === null ? "–" : (100 * m.top_label_share).toFixed(1) + "%"));
    tr.append(el("td", null, `${(100 * m.top1pct_share).toFixed(2)}% (${m.top1pct_rows.toLocaleString()} rows)`));
    tr.append(el("td", null, m.rows.toLocaleString()));
    t.append(tr);
  }
  return t;
}

// The authors' per-query plot: the top 500 rows' label (dots) against rank, the query's label highlighted.
function rankPlot(name, m, res) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 520, H = 120, n = m.rank.label.length;
  const maxLabel = Math.max(1, ...m.rank.label, res.label);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 16}`);
  svg.setAttribute("class", "rank-plot");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${name}: label of the top ${n} rows by ${res.score_name}, against rank`);
  m.rank.label.forEach((lab, i) => {
    const c = document.createElementNS(NS, "circle");
    c.setAttribute("cx", (8 + (i / Math.max(1, n - 1)) * (W - 16)).toFixed(1));
    c.setAttribute("cy", (8 + (1 - lab / maxLabel) * (H - 16)).toFixed(1));
    c.setAttribute("r", "1.6");
    c.setAttribute("class", lab === res.label ? "hit" : "miss");
    svg.append(c);
  });
  const cap = document.createElementNS(NS, "text");
  cap.setAttribute("x", "8");
  cap.setAttribute("y", String(H + 12));
  cap.textContent = `${name}: label (0 at the bottom, ${maxLabel} at the top; green: the query's label ${res.label}) of the top ${n} rows by ${res.score_name}, rank 1 at left`;
  svg.append(cap);
  return svg;
}

function layerCard(name, res, r, nRows, reference) {
  const meta = info.layers.find((l) => l.name === name) || {};
  const card = el("section", "layer");
  card.dataset.layer = name;
  const h = el("h2", null, name + " ");
  h.append(el("span", "muted", `${meta.kind || ""} ${meta.d_in} → ${meta.d_out}, ${res.rows.toLocaleString()} rows up to step ${res.at_step}` +
    (nRows > 1 ? ` · first of ${nRows} positions` : "")));
  card.append(h);

  // the certificate: the stored one (rebuilt weights at fit end) and this query's
  const cert = el("div", "cert");
  const c = meta.certificate || {};
  if (c.rel_err !== undefined) {
    cert.append("stored certificate: rebuilt weights within ");
    cert.append(el("b", null, sci(c.rel_err)));
    cert.append(" relative, ");
    cert.append(el("span", c.exact ? "ok" : "bad", c.exact ? "exact" : "NOT exact"));
    cert.append(` (tolerance ${sci(c.tolerance)})`);
  } else {
    cert.append("no stored certificate (the run did not finish, or certify=False)");
  }
  cert.append(" · this query: ");
  if (res.rel_err) {
    const from = info.form === "element-wise" ? " (weights replayed by the certificate)" : " (memory sums from the certificate)";
    cert.append(`dual form vs trained weights ${sci(res.rel_err[r])}` + (res.dual_source === "certificate" ? from : ""));
  } else {
    cert.append(res.at_step < info.last_step ? "model at an earlier step (no stored weights to compare with)" : "no final weights stored");
  }
  if (!res.exact_store) cert.append(el("span", "bad", " · inexact store"));
  card.append(cert);

  const body = el("div", "layer-body");
  const left = el("div", "rankings");
  for (const list of rankings(res, r)) {
    const sec = el("div", "ranking");
    sec.dataset.kind = list.kind;
    sec.append(el("h3", null, list.title));
    const thumbs = el("div", "thumbs");
    if (!list.items.length) thumbs.append(el("span", "muted", "none"));
    for (const it of list.items) thumbs.append(thumb(it, list.kind, list.label, reference));
    sec.append(thumbs);
    left.append(sec);
  }
  body.append(left);

  const charts = el("div", "charts");
  const names = scoreNames(res, r);
  if (res.mass && res.mass.label) charts.append(classBars(res.mass.label, r, reference, names));
  if (res.mass && res.mass.step) charts.append(stepBars(res.mass.step, r, names));
  body.append(charts);
  card.append(body);
  return card;
}

function thumb(it, kind, label, reference) {
  const t = el("div", "thumb" + (reference >= 0 && it.label === reference ? " match" : ""));
  t.dataset.index = it.index;
  const img = images.get("train:" + it.index);
  if (img) {
    const c = el("canvas");
    drawImage(c, img);
    c.title = `training example ${it.index}`;
    t.append(c);
  } else {
    t.append(el("div", "card", `#${it.index}`));
  }
  const cls = kind === "top" ? "score" : "score " + (it.score >= 0 ? "pos" : "neg");
  const num = el("div", cls);
  num.append(el("span", "what", label + " "));  // what the number is (the heading says it in full)
  num.append(kind === "top" ? fmt(it.score) : signed(it.score));
  num.title = `${label} = ${it.score}`;
  t.append(num);
  t.append(el("div", null, `#${it.index} · label ${it.label < 0 ? "?" : it.label}`));
  t.append(el("div", "muted", it.sub));
  return t;
}

function baseline(vals) {
  // where zero sits, as a fraction of the width or height: the left/bottom edge when every value is >= 0,
  // the right/top edge when every value is <= 0, else the middle
  const pos = vals.some((v) => v > 0), neg = vals.some((v) => v < 0);
  return pos && neg ? 0.5 : (neg ? 1 : 0);
}

function classBars(m, r, reference, names) {
  const wrap = el("div", "mass-label");
  wrap.append(el("h3", null, `attention mass by class: signed sum of the ${names.what}, ${names.formula}, over the ` +
    `class's patterns, as a share of the sum of |${names.short}|`));
  const grid = el("div", "bars");
  const signedRow = m.signed[r], absRow = m.absolute[r];
  const total = absRow.reduce((a, b) => a + Math.abs(b), 0) || 1;
  const keep = m.keys.map((key, g) => key >= 0 || absRow[g] !== 0);
  const shares = signedRow.map((v) => v / total);
  const shown = shares.filter((_, g) => keep[g]);
  const zero = baseline(shown);
  const room = zero === 0.5 ? 50 : 100;
  const maxAbs = Math.max(1e-12, ...shown.map(Math.abs));
  m.keys.forEach((key, g) => {
    if (!keep[g]) return;
    grid.append(el("div", "name" + (key === reference ? " hl" : ""), key < 0 ? "none" : String(key)));
    const track = el("div", "track");
    if (zero === 0.5) track.append(el("div", "mid"));
    const fill = el("div", "fill " + (shares[g] >= 0 ? "pos" : "neg"));
    const w = (room * Math.abs(shares[g])) / maxAbs;
    fill.style.width = w + "%";
    fill.style.left = (shares[g] >= 0 ? 100 * zero : 100 * zero - w) + "%";
    track.append(fill);
    grid.append(track);
    grid.append(el("div", "val", pct(shares[g])));
  });
  wrap.append(grid);
  return wrap;
}

function stepBars(m, r, names) {
  const wrap = el("div", "mass-step");
  wrap.append(el("h3", null, "attention mass over training steps"));
  const box = el("div", "steps");
  const vals = m.signed[r];
  const zero = baseline(vals);  // from the bottom
  const room = zero === 0.5 ? 50 : 100;
  const axis = el("div", "axis");
  axis.style.bottom = 100 * zero + "%";
  box.append(axis);
  const maxAbs = Math.max(1e-12, ...vals.map(Math.abs));
  const first = m.edges[0], last = m.edges[m.edges.length - 1];
  vals.forEach((v, b) => {
    const col = el("div", "col");
    col.title = `steps ${m.edges[b]}–${m.edges[b + 1] - 1}: signed sum of ${names.short} ${signed(v)}`;
    const bar = el("div", v >= 0 ? "up" : "down");
    bar.style.height = (room * Math.abs(v)) / maxAbs + "%";
    if (v >= 0) bar.style.bottom = 100 * zero + "%"; else bar.style.top = 100 * (1 - zero) + "%";
    col.append(bar);
    box.append(col);
  });
  info.epoch_starts.forEach((s, i) => {
    if (s <= first || s >= last) return;
    const mark = el("div", "epoch");
    mark.style.left = (100 * (s - first)) / (last - first) + "%";
    mark.append(el("span", null, `epoch ${info.epochs[i]}`));
    box.append(mark);
  });
  wrap.append(box);
  const ticks = el("div", "steps-axis");
  ticks.append(el("span", null, `step ${first}`));
  ticks.append(el("span", null, `signed sum of the ${names.what}, ${names.formula}, per bucket; dashed: epoch starts`));
  ticks.append(el("span", null, `step ${last}`));
  wrap.append(ticks);
  return wrap;
}

// ------------------------------------------------------------------------------------------------
// start
// ------------------------------------------------------------------------------------------------
async function start() {
  try {
    info = await api("/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  document.title = `${info.name} · lightning-dualform view`;
  $("store-line").textContent = `${info.store} · ${info.status} · steps ${info.first_step}–${info.last_step} · ` +
    `${info.layers.length} layer(s) · ${info.row_dtype} rows · ${info.update_rule}` +
    (info.form === "element-wise" ? " (element-wise: a pattern's attention weight depends on the output unit)" : "");
  $("cache-line").textContent = info.cache_text ? "cache: " + info.cache_text : "no cache";
  state.topK = info.defaults.top_k;
  state.contribution = info.defaults.contribution_to;
  state.score = info.defaults.score;
  readHash();
  const splitSel = $("split");
  for (const s of info.splits) splitSel.append(new Option(`${s.name} (${s.n})`, s.name));
  if (!info.splits.length) splitSel.append(new Option("no recorded queries: upload a .npy", ""));
  const layerSel = $("layer");
  layerSel.append(new Option("all layers", ""));
  for (const l of info.layers) layerSel.append(new Option(l.name, l.name));
  if (!info.layers.some((l) => l.name === state.layer)) state.layer = "";
  layerSel.value = state.layer;
  $("top-k").value = state.topK;
  $("by").value = state.by;
  $("contribution").value = state.contribution;
  $("score").value = state.score;
  const methodSel = $("method");
  for (const m of info.influence.methods) methodSel.append(new Option(m.title, `${m.method}:${m.layers}`));
  const values = info.influence.methods.map((m) => `${m.method}:${m.layers}`);
  if (!values.includes(state.method)) state.method = values[0];
  methodSel.value = state.method;
  const slider = $("at-step");
  slider.min = Math.min(info.first_step + 1, info.last_step);
  slider.max = info.last_step;
  slider.value = state.atStep === null ? info.last_step : state.atStep;
  $("at-step-value").textContent = stepLabel(parseInt(slider.value, 10));
  bindControls();
  if (info.splits.length) {
    const names = info.splits.map((s) => s.name);
    const split = names.includes(state.split) ? state.split : (names.includes("test") ? "test" : names[0]);
    splitSel.value = split;
    await loadSplit(split);
    refresh();
  }
}

start();
