// The dashboard page: polls the JSON API, keeps each run's evaluations in columns, draws.

import { Plot, niceTicks, timeTicks, formatDuration } from "./chart.js";
import { renderExpertMap } from "./expertmap.js";

const POLL_MS = 1500;
const COLOR = {
  init: "#98a2b3", prune: "#2f6fde", merge: "#e8890c", best: "#6d28d9", dev: "#12946b",
  test: "#d1306b", boundary: "#475467", full: "#344054", random: "#8a94a6", mergeBand: "#fff7eb",
};
const RUN_COLORS = ["#6d28d9", "#2f6fde", "#e8890c", "#12946b", "#d1306b", "#0e9aa7", "#7a5c2e", "#475467"];
const PHASES = ["init", "prune", "merge", "other"];
const PHASE_LABEL = { init: "initial population", prune: "pruning", merge: "merging", other: "other" };

const $ = (id) => document.getElementById(id);
const state = {
  runs: [], current: null, xmode: "index", matrix: "expert_merge",
  data: new Map(), summaries: new Map(), best: null, bestKey: "", lastOk: 0, dirty: true,
};
const fitnessPlot = new Plot($("fitness"));
const comparePlot = new Plot($("compare"));

// ------------------------------------------------------------------------------- data
function emptyRun() {
  return {
    n: 0,                      // records received (all splits): the next `since`
    ids: [], sx: [], st: [], sy: [], sw: [], ss: [], sphase: [],  // one entry per search record
    byPhase: { init: [], prune: [], merge: [], other: [] },
    steps: [],                 // best-so-far improvements: [search index, score]
    best: -Infinity, ymin: Infinity, ymax: -Infinity, boundary: null,
  };
}

function runData(name) {
  if (!state.data.has(name)) state.data.set(name, emptyRun());
  return state.data.get(name);
}

// Fold a /evaluations?format=columns answer into the run's search columns.
function append(d, answer) {
  const c = answer.columns;
  const count = c.id.length;
  for (let k = 0; k < count; k++) {
    if (c.split[k] !== "search") continue;
    const i = d.sx.length;
    const phase = PHASES.includes(c.phase[k]) ? c.phase[k] : "other";
    const score = c.failed[k] ? null : c.score[k];
    d.ids.push(c.id[k]);
    d.sx.push(i + 1);
    d.st.push(c.elapsed[k] ?? 0);
    d.sy.push(score);
    d.sw.push(c.worker[k]);
    d.ss.push(c.seconds[k]);
    d.sphase.push(phase);
    d.byPhase[phase].push(i);
    if (phase === "merge" && d.boundary === null) d.boundary = i;
    if (score !== null) {
      if (score > d.best) { d.best = score; d.steps.push(i); }
      if (score < d.ymin) d.ymin = score;
      if (score > d.ymax) d.ymax = score;
    }
  }
  d.n = answer.next;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// ------------------------------------------------------------------------------- polling
async function tick() {
  try {
    state.runs = await getJSON("/api/runs");
    if (!state.current || !state.runs.some((r) => r.name === state.current)) {
      const wanted = new URLSearchParams(location.hash.slice(1)).get("run");
      state.current = state.runs.some((r) => r.name === wanted) ? wanted : state.runs[0]?.name ?? null;
    }
    renderTabs();
    if (state.current) await pollRun(state.current);
    if (state.runs.length > 1) {
      await Promise.all(state.runs.filter((r) => r.name !== state.current).map(async (r) => {
        state.summaries.set(r.name, await getJSON(`/api/runs/${r.name}/summary`));
      }));
    }
    state.lastOk = Date.now();
    if (state.dirty) render();
  } catch (err) {
    console.warn(err);
  }
  renderConnection();
  setTimeout(tick, POLL_MS);
}

async function pollRun(name) {
  const d = runData(name);
  const answer = await getJSON(`/api/runs/${name}/evaluations?since=${d.n}&format=columns`);
  if (answer.total < d.n) {  // the file was replaced: start over
    state.data.set(name, emptyRun());
    state.dirty = true;
    return pollRun(name);
  }
  if (answer.columns.id.length) { append(d, answer); state.dirty = true; }
  const summary = await getJSON(`/api/runs/${name}/summary`);
  const before = state.summaries.get(name);
  if (!before || JSON.stringify(before) !== JSON.stringify(summary)) state.dirty = true;
  state.summaries.set(name, summary);
  const key = `${name}/${summary.best?.id ?? ""}`;
  if (key !== state.bestKey) {
    state.best = summary.best ? await getJSON(`/api/runs/${name}/best`) : null;
    state.bestKey = key;
    state.dirty = true;
    renderExpertPanel();
  }
}

// ------------------------------------------------------------------------------- rendering
function render() {
  state.dirty = false;
  const summary = state.summaries.get(state.current);
  renderHead(summary);
  renderKpis(summary);
  drawFitness();
  drawCompare();
  renderWorkers(summary);
  renderFinal(summary);
}

function renderTabs() {
  const nav = $("runs");
  const names = state.runs.map((r) => `${r.name}:${r.status}`).join("|") + `|${state.current}`;
  if (nav.dataset.key === names) return;
  nav.dataset.key = names;
  nav.replaceChildren(...state.runs.map((r) => {
    const button = document.createElement("button");
    const dot = document.createElement("span");
    dot.className = `dot ${r.status}`;
    button.append(dot, r.name);
    button.title = `${r.path} (${r.status})`;
    button.setAttribute("aria-selected", String(r.name === state.current));
    button.addEventListener("click", () => selectRun(r.name));
    return button;
  }));
}

function selectRun(name) {
  if (name === state.current) return;
  state.current = name;
  state.bestKey = "";
  state.best = null;
  history.replaceState(null, "", `#run=${encodeURIComponent(name)}`);
  $("runs").dataset.key = "";
  renderTabs();
  state.dirty = true;
  pollRun(name).then(render).catch(console.warn);
}

function renderConnection() {
  const el = $("connection");
  const age = (Date.now() - state.lastOk) / 1000;
  const lost = !state.lastOk || age > 3 * POLL_MS / 1000 + 2;
  el.classList.toggle("lost", lost);
  el.textContent = lost ? (state.lastOk ? "connection lost · retrying" : "connecting…") : "live · polling every 1.5 s";
}

function fmt(v, digits = 3) {
  return v == null || !isFinite(v) ? "—" : Number(v).toFixed(digits);
}

function fact(label, value) {
  const span = document.createElement("span");
  const b = document.createElement("b");
  b.textContent = value ?? "—";
  span.append(`${label} `, b);
  return span;
}

function renderHead(s) {
  if (!s) return;
  $("run-title").textContent = s.config.name || s.name;
  const experts = state.best?.num_experts ?? s.final?.num_experts;
  const parts = [
    fact("model", s.config.model), fact("task", s.config.task),
    fact("keep", s.config.keep != null ? `${s.config.keep}${experts ? ` of ${experts}` : ""} experts` : null),
    fact("strategy", s.config.strategy), fact("router", s.config.router_mapping),
  ];
  const facts = $("run-facts");
  facts.replaceChildren();
  parts.forEach((p, k) => { if (k) facts.append(" · "); facts.append(p); });
  const pill = $("run-status");
  pill.textContent = s.status;
  pill.className = `pill ${s.status}`;
  $("run-path").textContent = s.path;
  document.title = `${s.config.name || s.name} · eep dashboard`;
}

function renderKpis(s) {
  if (!s) return;
  const p = s.progress;
  $("kpi-best").textContent = fmt(s.best?.score, 4);
  $("kpi-best-sub").textContent = s.best ? `${s.best.id} · evaluation #${s.best.index + 1}` : "no score yet";
  const progress = $("kpi-progress");
  progress.textContent = p.done.toLocaleString();
  if (p.budget) {
    const of = document.createElement("small");
    of.textContent = ` / ${p.budget.toLocaleString()}`;
    progress.append(of);
  }
  $("kpi-progress-bar").style.width = `${Math.round(100 * (p.fraction ?? 0))}%`;
  let sub = p.fraction != null ? `${Math.round(100 * p.fraction)}%` : "no budget in config";
  if (s.status === "running" && p.eta_seconds != null) sub += ` · ETA ${formatDuration(p.eta_seconds)}`;
  else if (s.status === "finished") sub += ` · searched in ${formatDuration(p.elapsed)}`;
  else if (s.status === "stopped") sub += " · stopped (resume with --resume)";
  // The budget actually spent: examples scored, fewer than evaluations x split with early rejection.
  if (p.examples) sub += ` · ${p.examples.toLocaleString()} examples` + (p.rejected ? `, ${p.rejected.toLocaleString()} rejected early` : "");
  $("kpi-progress-sub").textContent = sub;
  const d = runData(s.name);
  const phase = s.phase ? PHASE_LABEL[s.phase] ?? s.phase : "—";
  $("kpi-phase").textContent = s.status === "finished" ? "done" : phase;
  $("kpi-phase-sub").textContent = s.phase_boundary != null
    ? `merging since evaluation #${s.phase_boundary + 1}`
    : d.sx.length ? "pruning: discrete search over kept experts" : "";
  $("kpi-rate").textContent = p.rate_per_min != null ? `${fmt(p.rate_per_min, p.rate_per_min < 10 ? 1 : 0)} /min` : "—";
  const failed = s.counts.failed;
  $("kpi-rate-sub").textContent = `${s.workers.length} worker${s.workers.length === 1 ? "" : "s"} · ${failed} failed`;
  const ref = references(s);
  const test = chosenRow(s)?.test ?? ref.chosenTest;
  $("kpi-heldout").textContent = test != null ? `test ${fmt(test)}` : "—";
  const bits = [];
  if (ref.bestDev != null) bits.push(`dev ${fmt(ref.bestDev)}`);
  if (ref.full != null) bits.push(`full model ${fmt(ref.full)}`);
  $("kpi-heldout-sub").textContent = bits.length ? bits.join(" · ") : "dev/test come after the search";
}

// Held-out facts for the chart: full model and random baselines (test), dev/test markers.
function references(s) {
  const out = { full: null, random: null, bestDev: null, chosenTest: null, dev: [], test: [] };
  const held = s?.held_out ?? {};
  const baselines = [];
  for (const split of ["dev", "test"]) {
    for (const row of held[split] ?? []) {
      if (row.score == null) continue;
      if (row.id === "full") { if (split === "test") out.full = row.score; continue; }
      if (row.phase === "baseline") { if (split === "test") baselines.push(row.score); continue; }
      if (row.at != null) out[split].push(row);
      if (split === "dev" && (out.bestDev == null || row.score > out.bestDev)) out.bestDev = row.score;
    }
  }
  if (baselines.length) out.random = baselines.reduce((a, b) => a + b, 0) / baselines.length;
  for (const row of s?.final?.rows ?? []) {
    if (row.row === "reference" && row.test != null) out.full = row.test;
    if (row.row === "baseline" && row.test != null) out.random = row.test;
  }
  const chosen = chosenRow(s)?.id;
  const hit = out.test.find((r) => r.id === chosen);
  if (hit) out.chosenTest = hit.score;
  return out;
}

function renderLegend(d, ref) {
  const items = [];
  const add = (cls, color, text) => {
    const span = document.createElement("span");
    const i = document.createElement("i");
    i.className = cls;
    if (cls === "dash") i.style.borderColor = color; else i.style.background = color;
    span.append(i, text);
    items.push(span);
  };
  for (const phase of PHASES) if (d.byPhase[phase].length) add("", COLOR[phase] ?? COLOR.init, PHASE_LABEL[phase]);
  add("line", COLOR.best, "best so far");
  if (d.boundary !== null) add("dash", COLOR.boundary, "pruning → merging");
  if (ref.dev.length) add("diamond", COLOR.dev, "dev");
  if (ref.test.length) add("square", COLOR.test, "test");
  if (d.sy.some((v) => v === null)) add("", "#dc2626", "failed");
  const legend = $("legend");
  legend.replaceChildren(...items);
}

function xOf(d, i) {
  return state.xmode === "index" ? d.sx[i] : d.st[i];
}

function drawFitness() {
  const started = performance.now();
  const canvas = $("fitness");
  const s = state.summaries.get(state.current);
  const d = runData(state.current);
  const plot = fitnessPlot;
  plot.begin();
  const n = d.sx.length;
  $("fitness-empty").hidden = n > 0;
  canvas.dataset.points = String(n);
  if (!n || !s) { canvas.dataset.drawn = "0"; return; }
  const ref = references(s);
  renderLegend(d, ref);

  const byIndex = state.xmode === "index";
  const xs = byIndex ? d.sx : d.st;
  const lastX = xs[n - 1];
  const xmax = byIndex ? Math.max(n, s.progress.budget ?? 0) : Math.max(...[lastX, 1e-9]) * 1.01;
  let lo = d.ymin, hi = d.ymax;
  for (const v of [ref.full, ref.random, ...ref.dev.map((r) => r.score), ...ref.test.map((r) => r.score)]) {
    if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  const pad = Math.max(0.02, (hi - lo) * 0.06);
  lo = Math.max(0, lo - pad); hi = Math.min(1, hi + pad);
  const yt = niceTicks(lo, hi, 5);
  lo = Math.max(0, Math.floor(lo / yt.step) * yt.step); hi = Math.min(1, Math.ceil(hi / yt.step) * yt.step);
  const xmin = 0;
  // A little room below the lowest tick keeps zero scores off the axis and above the failures.
  plot.setRange(xmin, xmax, lo - (hi - lo) * 0.045, hi);

  const xt = byIndex ? { ticks: niceTicks(xmin, xmax, 8).ticks, label: (v) => v.toLocaleString() } : timeTicks(xmin, xmax);
  if (d.boundary !== null) plot.shade(xOf(d, d.boundary), lastX, COLOR.mergeBand);
  plot.axes({
    xticks: xt.ticks, xfmt: xt.label, xlabel: byIndex ? "evaluation" : "search wall time",
    yticks: niceTicks(lo, hi, 5).ticks, yfmt: (v) => v.toFixed(yt.step < 0.01 ? 3 : 2),
    ylabel: s.best ? "search score" : "score",
  });
  if (ref.full != null) plot.hline(ref.full, `full model (test) ${fmt(ref.full)}`, COLOR.full);
  if (ref.random != null) plot.hline(ref.random, `random pruning (test, mean) ${fmt(ref.random)}`, COLOR.random);

  let drawn = 0;
  for (const phase of PHASES) {
    if (d.byPhase[phase].length) drawn += plot.scatter(xs, d.sy, d.byPhase[phase], { color: COLOR[phase] ?? COLOR.init });
  }
  const steps = d.steps.map((i) => [xs[i], d.sy[i]]);
  plot.steps(steps, lastX, { color: COLOR.best, width: 2.5 });
  if (d.boundary !== null) plot.vline(xOf(d, d.boundary), "pruning → merging", COLOR.boundary);
  state.markers = [...ref.dev.map((r) => ({ ...r, split: "dev" })), ...ref.test.map((r) => ({ ...r, split: "test" }))];
  const mark = (split) => state.markers.map((r, k) => [xOf(d, r.at), r.score, k, r.split]).filter((m) => m[3] === split);
  plot.markers(mark("dev"), "diamond", COLOR.dev);
  plot.markers(mark("test"), "square", COLOR.test);

  canvas.dataset.drawn = String(drawn);
  canvas.dataset.boundary = d.boundary === null ? "" : String(d.boundary + 1);
  canvas.dataset.best = String(d.best);
  canvas.dataset.drawMs = (performance.now() - started).toFixed(1);
  canvas.dataset.renderMs = performance.now().toFixed(0);  // since navigation start
}

function drawCompare() {
  const card = $("compare-card");
  const runs = state.runs;
  card.hidden = runs.length < 2;
  if (card.hidden) return;
  const plot = comparePlot;
  plot.begin();
  const byIndex = state.xmode === "index";
  let xmax = 1, lo = Infinity, hi = -Infinity;
  const lines = runs.map((r, k) => {
    const s = state.summaries.get(r.name);
    const steps = (s?.best_steps ?? []).map(([i, elapsed, score]) => [byIndex ? i + 1 : elapsed ?? 0, score]);
    const end = byIndex ? s?.progress.done ?? 0 : s?.progress.elapsed ?? 0;
    xmax = Math.max(xmax, end);
    for (const [, y] of steps) { lo = Math.min(lo, y); hi = Math.max(hi, y); }
    return { name: r.name, color: RUN_COLORS[k % RUN_COLORS.length], steps, end };
  });
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  const pad = Math.max(0.02, (hi - lo) * 0.08);
  lo = Math.max(0, lo - pad); hi = Math.min(1, hi + pad);
  plot.setRange(0, xmax * 1.01, lo, hi);
  const xt = byIndex ? { ticks: niceTicks(0, xmax, 8).ticks, label: (v) => v.toLocaleString() } : timeTicks(0, xmax);
  plot.axes({ xticks: xt.ticks, xfmt: xt.label, xlabel: byIndex ? "evaluation" : "search wall time",
    yticks: niceTicks(lo, hi, 4).ticks, yfmt: (v) => v.toFixed(2), ylabel: "best score" });
  for (const line of lines) plot.steps(line.steps, line.end, { color: line.color, width: 2.2 });
  $("compare-legend").replaceChildren(...lines.map((line) => {
    const span = document.createElement("span");
    const i = document.createElement("i");
    i.className = "line";
    i.style.background = line.color;
    span.append(i, line.name);
    return span;
  }));
  $("compare").dataset.runs = String(lines.length);
}

function renderExpertPanel() {
  const best = state.best;
  const head = $("best-head");
  if (!best) { head.textContent = "no scored candidate yet"; renderExpertMap($("expert-map"), $("expert-scale"), null); return; }
  if (!best.layers) { head.textContent = `${best.id}: candidate file not written yet`; renderExpertMap($("expert-map"), $("expert-scale"), null); return; }
  const kind = best.pure_pruning ? "pure pruning (one-hot rows)" : "merged experts";
  // A per-layer budget keeps different counts per layer: show their range.
  const lo = Math.min(...best.keep), hi = Math.max(...best.keep);
  head.textContent = `${best.id} · score ${fmt(best.score, 4)} · ${best.phase || "—"} phase · ${kind} · ` +
    `keep ${lo === hi ? lo : `${lo}–${hi}`} of ${best.num_experts} per layer`;
  renderExpertMap($("expert-map"), $("expert-scale"), best, state.matrix);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function renderWorkers(s) {
  const body = $("workers").tBodies[0];
  if (!s) return;
  body.replaceChildren(...s.workers.map((w) => {
    const tr = document.createElement("tr");
    const util = document.createElement("td");
    const wrap = document.createElement("div");
    wrap.className = "util";
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${Math.round(100 * (w.utilisation ?? 0))}%`;
    bar.append(fill);
    const label = document.createElement("span");
    label.textContent = w.utilisation != null ? `${Math.round(100 * w.utilisation)}%` : "—";
    wrap.append(bar, label);
    util.append(wrap);
    tr.append(cell(w.worker, "mono"), cell(w.evaluations.toLocaleString()), cell(String(w.failed), w.failed ? "bad" : ""),
      cell(fmt(w.per_min, 1)), cell(fmt(w.mean_seconds, 1)), util);
    return tr;
  }));
  $("workers-sub").textContent = s.workers.length
    ? "utilisation: share of the run's wall time spent evaluating" : "no evaluation yet";
}

// The summary's method rows (labels and row kinds come from summary.json via the server).
function chosenRow(s) {
  return (s?.final?.rows ?? []).find((r) => r.chosen);
}

function renderFinal(s) {
  const card = $("final-card");
  const rows = s?.final?.rows;
  card.hidden = !rows;
  if (!rows) return;
  $("final").tBodies[0].replaceChildren(...rows.map((m) => {
    const tr = document.createElement("tr");
    if (m.chosen) tr.className = "highlight";
    tr.append(cell(m.label), cell(fmt(m.test)), cell(fmt(m.dev)), cell(fmt(m.search)),
      cell(String(m.evaluations ?? "—")), cell(m.id ?? "", "mono"));
    return tr;
  }));
  const f = s.final;
  $("final-sub").textContent = `${f.task}: keep ${f.keep} of ${f.num_experts} experts, top-${f.top_k}, test split`;
}

// ------------------------------------------------------------------------------- hover
function showTooltip(ev) {
  const tip = $("tooltip");
  const rect = $("fitness").getBoundingClientRect();
  const mx = ev.clientX - rect.left, my = ev.clientY - rect.top;
  const hit = fitnessPlot.hitTest(mx, my);
  const d = runData(state.current);
  if (!hit) { tip.hidden = true; return; }
  tip.replaceChildren();
  const b = document.createElement("b");
  if (hit > 0) {
    const i = hit - 1;
    b.textContent = `#${i + 1} ${d.ids[i]}`;
    tip.append(b, ` · ${PHASE_LABEL[d.sphase[i]] ?? d.sphase[i]}`, document.createElement("br"),
      `score ${d.sy[i] == null ? "failed" : fmt(d.sy[i], 4)} · ${d.sw[i]} · ${fmt(d.ss[i], 1)} s · at ${formatDuration(d.st[i])}`);
  } else {
    const m = state.markers[-hit - 1];
    b.textContent = `${m.split} ${m.id}`;
    tip.append(b, ` · score ${fmt(m.score, 4)}`);
  }
  tip.hidden = false;
  const left = Math.min(mx + 14, rect.width - tip.offsetWidth - 4);
  tip.style.left = `${left}px`;
  tip.style.top = `${Math.max(0, my - tip.offsetHeight - 10)}px`;
}

// ------------------------------------------------------------------------------- controls
function toggle(ids, pick) {
  for (const [id, value] of ids) {
    $(id).addEventListener("click", () => {
      for (const [other] of ids) $(other).setAttribute("aria-pressed", String(other === id));
      pick(value);
    });
  }
}

toggle([["x-index", "index"], ["x-time", "time"]], (v) => { state.xmode = v; drawFitness(); drawCompare(); });
toggle([["m-merge", "expert_merge"], ["m-router", "router_map"]], (v) => { state.matrix = v; renderExpertPanel(); });
$("fitness").addEventListener("mousemove", showTooltip);
$("fitness").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
let resizeQueued = false;
window.addEventListener("resize", () => {
  if (resizeQueued) return;
  resizeQueued = true;
  requestAnimationFrame(() => { resizeQueued = false; drawFitness(); drawCompare(); });
});

tick();
