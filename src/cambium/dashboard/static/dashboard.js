// cambium dashboard: draws the runs list, a run and a comparison from the JSON routes (see cambium/dashboard/app.py).
"use strict";

const PAGE = JSON.parse(document.getElementById("page-data").textContent);
const MAIN = document.getElementById("main");
const POLL_MS = 2000;
const COLORS = ["#2456c9", "#d1495b", "#2a9d4b", "#e09f3e", "#6c4ab6", "#1b998b", "#8c564b", "#e377c2"];
const STATE_COLORS = {
  DORMANT: "#c7ccd6", GERMINATED: "#9fd3f5", LOADING: "#7fb8e6", TRAINING: "#4f9de0", GRAFTING: "#7f6fd6",
  STABILIZATION: "#e0b04f", EVALUATING: "#d9c74a", FINE_TUNING: "#e08a4f", FOSSILIZED: "#2a9d4b", CULLED: "#c93a3a",
  ROLLED_BACK: "#8c564b",
};

// Chart groups of the run page: the first group whose pattern matches a metric name gets it (val/loss: val).
const GROUPS = [
  ["val", "validation", /^(val[/_.].*|[a-z0-9_]+\/holdout_loss)$/],
  ["loss", "loss", /^(loss|lm_loss|aux_loss|train_loss|[a-z0-9_]+\/loss)$/],
  ["lr", "learning rate", /^(lr(\/.*)?|[a-z0-9_]+\/lr)$/],
  ["throughput", "throughput", /^perf\/.*_per_s$/],
  ["step_ms", "step time (ms)", /^perf\/.*step_ms$/],
  ["mfu", "MFU", /^perf\/.*mfu$/],
  ["balance", "expert load max/mean", /^moe\/l\d+\/max_over_mean$/],
  ["entropy", "router entropy", /^moe\/l\d+\/router_entropy$/],
  ["seeds", "seeds", /^seeds_/],
];
let X_TITLE = "step";  // what metric rows are numbered by
const PER_EXPERT = /^moe\/l\d+\/(load|bias)\/e\d+$/;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : r.statusText);
  return body;
}

function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of params) if (v !== null && v !== undefined && v !== "") q.append(k, v);
  return q.toString();
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : String(+v.toPrecision(5));
}

function badge(status) { return el("span", { class: "badge " + status, text: status }); }

function widthOf(node) { return Math.max(50, Math.min(4000, Math.round(node.clientWidth || 600))); }

const LAYOUT = { margin: { l: 55, r: 15, t: 36, b: 40 }, height: 320,
                 legend: { orientation: "h", y: -0.32, yanchor: "top" }, xaxis: { title: { text: "step" } } };

// ---------------------------------------------------------------- runs list
async function runsPage() {
  const params = new URLSearchParams(location.search);
  const form = el("form", { class: "filters", method: "get" });
  const system = el("select", { name: "system", id: "f-system" }, el("option", { value: "", text: "all systems" }));
  const status = el("select", { name: "status", id: "f-status" }, el("option", { value: "", text: "any status" }));
  for (const s of PAGE.statuses) status.append(el("option", { value: s, text: s }));
  const since = el("input", { type: "date", name: "since", value: params.get("since") || "" });
  const until = el("input", { type: "date", name: "until", value: params.get("until") || "" });
  form.append(el("label", {}, "system", system), el("label", {}, "status", status),
              el("label", {}, "created from", since), el("label", {}, "to", until),
              el("button", { type: "submit", text: "filter" }));
  const compare = el("button", { type: "button", id: "compare", text: "compare selected" });
  const table = el("table", { id: "runs" });
  MAIN.append(el("h1", { text: "Runs" }), form, table, el("p", {}, compare));
  compare.onclick = () => {
    const ids = [...table.querySelectorAll("input:checked")].map((c) => c.value);
    if (ids.length >= 2) location.href = "/compare?" + qs(ids.map((i) => ["run", i]));
    else alert("select two or more runs");
  };
  const query = qs(["system", "status", "since", "until"].map((k) => [k, params.get(k)]));
  let first = true;
  async function refresh() {
    let data;
    try { data = await getJSON("/api/runs?" + query); } catch (e) {
      table.replaceChildren(el("tr", {}, el("td", { class: "error", text: String(e) }))); return false;
    }
    if (first) {
      for (const s of data.systems) system.append(el("option", { value: s, text: s }));
      system.value = params.get("system") || ""; status.value = params.get("status") || ""; first = false;
    }
    const checked = new Set([...table.querySelectorAll("input:checked")].map((c) => c.value));
    const head = el("tr", {}, ...["", "id", "system", "name", "status", "created", "steps", "latest"].map(
      (h) => el("th", { text: h })));
    const rows = data.runs.map((r) => {
      const box = el("input", { type: "checkbox", value: r.id });
      box.checked = checked.has(r.id);
      const latest = Object.entries(r.latest || {}).map(([k, v]) => `${k}=${fmt(v)}`).join("  ");
      return el("tr", { "data-run": r.id, "data-system": r.system },
        el("td", {}, box), el("td", {}, el("a", { href: "/runs/" + encodeURIComponent(r.id), text: r.id })),
        el("td", { text: r.system }), el("td", { text: r.name }), el("td", {}, badge(r.status)),
        el("td", { text: r.created.slice(0, 19).replace("T", " ") }),
        el("td", { class: "num", text: r.steps === null ? "-" : String(r.steps) }), el("td", { text: latest }));
    });
    table.replaceChildren(head, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, text: "no runs" }))]));
    table.dataset.loaded = String(data.runs.length);
    return data.runs.some((r) => r.status === "running");
  }
  const live = await refresh();
  document.body.dataset.ready = "1";
  if (live) {
    const timer = setInterval(async () => { if (!(await refresh())) clearInterval(timer); }, POLL_MS * 2);
  }
}

// ---------------------------------------------------------------- run page
function groupNames(names) {
  const groups = new Map(GROUPS.map(([key, title]) => [key, { title, names: [] }]));
  const other = [];
  for (const n of names) {
    if (PER_EXPERT.test(n)) continue;
    const hit = GROUPS.find(([, , re]) => re.test(n));
    if (hit) groups.get(hit[0]).names.push(n); else other.push(n);
  }
  return { groups: [...groups.entries()].filter(([, g]) => g.names.length), other };
}

async function fetchSeries(run, names, points, since) {
  // One request per 60 names (the route takes at most 64): a page's charts cost one metrics-file open, not one each.
  const out = {};
  for (let i = 0; i < names.length; i += 60) {
    const body = await getJSON(`/api/runs/${encodeURIComponent(run)}/series?` +
      qs([...names.slice(i, i + 60).map((n) => ["name", n]), ["points", points], ["since", since]]));
    Object.assign(out, body.series);
  }
  return out;
}

class LineChart {
  // One plotly chart: several metrics of one run, or one metric over several runs (compare).
  constructor(node, title, traces) {
    this.node = node; this.title = title; this.traces = traces; // [{run, name, label}]
    this.last = -1;
  }
  async lookup(points, since) {
    // Each trace's series, fetched trace by trace (a chart of its own, or traces of different runs).
    const found = [];
    for (const t of this.traces) found.push((await fetchSeries(t.run, [t.name], points, since))[t.name]);
    return found;
  }
  async draw(prefetched) {
    const found = prefetched ? this.traces.map((t) => prefetched[t.name]) : await this.lookup(widthOf(this.node), -1);
    const data = [];
    let last = -1;
    for (const [i, t] of this.traces.entries()) {
      const s = found[i] || { step: [], value: [] };
      if (s.step.length) last = Math.max(last, s.step[s.step.length - 1]);
      data.push({ x: s.step, y: s.value, name: t.label, mode: s.step.length > 1 ? "lines" : "markers",
                  line: { color: COLORS[i % COLORS.length], width: 1.6 }, connectgaps: false });
    }
    this.last = last;
    this.node.dataset.points = String(data.reduce((a, d) => a + d.x.length, 0));
    await Plotly.newPlot(this.node, data, { ...LAYOUT, title: { text: this.title, font: { size: 14 } },
                                            xaxis: { title: { text: X_TITLE } } },
                         { displaylogo: false, responsive: true });
  }
  extend(fresh) {
    // Live: append the points after the last one drawn (`fresh`: name -> series of the steps after it).
    const xs = [], ys = [], idx = [];
    for (const [i, t] of this.traces.entries()) {
      const s = fresh[t.name];
      if (!s) continue;
      const keep = s.step.map((step, k) => [step, s.value[k]]).filter(([step]) => step > this.last);
      if (!keep.length) continue;
      xs.push(keep.map((p) => p[0])); ys.push(keep.map((p) => p[1])); idx.push(i);
    }
    if (!idx.length) return;
    Plotly.extendTraces(this.node, { x: xs, y: ys }, idx);
    this.last = Math.max(this.last, ...xs.map((x) => x[x.length - 1]));
    this.node.dataset.points = String(this.node.data.reduce((a, d) => a + d.x.length, 0));
  }
}

function summaryText(summary) {
  const entries = Object.entries(summary);
  if (!entries.length) return "";
  const shown = entries.slice(0, 12).map(([k, v]) => `${k}=${fmt(v)}`).join("  ");
  return "summary: " + shown + (entries.length > 12 ? `  … and ${entries.length - 12} more` : "");
}

async function runPage() {
  const id = PAGE.run;
  const run = await getJSON("/api/runs/" + encodeURIComponent(id));
  const status = el("span", { id: "status" }, badge(run.status));
  const steps = el("span", { id: "steps", text: run.steps === null ? "-" : String(run.steps) });
  MAIN.append(el("h1", { text: run.id }),
    el("p", { class: "meta" }, `${run.system} · ${run.name} · created ${run.created.slice(0, 19).replace("T", " ")}`
       + " · status ", status, " · last step ", steps),
    el("p", { class: "meta", id: "summary", text: summaryText(run.summary || {}) }));
  if (run.system === "morph") X_TITLE = "epoch";  // morph numbers its rows by epoch
  const names = Object.keys(run.names);
  const { groups, other } = groupNames(names);
  const charts = [];
  MAIN.append(el("h2", { text: "Curves" }));
  const grid = el("div", { class: "grid", id: "curves" });
  MAIN.append(grid);
  if (!names.length) grid.append(el("p", { class: "note", text: "no metrics yet" }));
  for (const [key, g] of groups) {
    const node = el("div", { class: "chart", id: "chart-" + key });
    grid.append(node);
    charts.push(new LineChart(node, g.title, g.names.map((n) => ({ run: id, name: n, label: n }))));
  }
  if (other.length) {
    const pick = el("select", { id: "pick-other" }, ...other.map((n) => el("option", { value: n, text: n })));
    const node = el("div", { class: "chart", id: "chart-other" });
    grid.append(el("div", {}, el("label", { class: "meta" }, "other metric: ", pick), node));
    const chart = new LineChart(node, other[0], [{ run: id, name: other[0], label: other[0] }]);
    charts.push(chart);
    pick.onchange = () => { chart.traces = [{ run: id, name: pick.value, label: pick.value }];
                            chart.title = pick.value; chart.draw(); };
  }
  const shown = [...new Set(charts.flatMap((c) => c.traces.map((t) => t.name)))];
  const first = await fetchSeries(id, shown, Math.max(...charts.map((c) => widthOf(c.node)), 50), -1);
  for (const c of charts) await c.draw(first);

  const panels = [];
  if (run.experts && (run.experts.load || run.experts.bias)) panels.push(moePanel(id, run.experts));
  if (run.system === "morph") panels.push(morphPanel(id));
  if (run.system === "screener") panels.push(screenerPanel(id));
  panels.push(artifactsPanel(id));
  for (const p of panels) await p.draw();

  MAIN.append(el("h2", { text: "Config" }), el("pre", { class: "config", id: "config", text: run.config || "(no config.toml)" }));
  if (run.provenance) {
    const p = run.provenance;
    MAIN.append(el("p", { class: "meta", text: `git ${(p.git || {}).commit || "-"}${(p.git || {}).dirty ? " (dirty)" : ""}`
      + ` · seed ${p.seed} · host ${p.host} · resumes ${(p.resumes || []).length}` }));
  }
  document.body.dataset.ready = "1";

  if (run.status !== "running") return;
  const timer = setInterval(async () => {
    try {
      const now = await getJSON("/api/runs/" + encodeURIComponent(id));
      status.replaceChildren(badge(now.status));
      steps.textContent = now.steps === null ? "-" : String(now.steps);
      const since = Math.max(-1, ...charts.map((c) => c.last));
      const names = [...new Set(charts.flatMap((c) => c.traces.map((t) => t.name)))];
      const fresh = await fetchSeries(id, names, 400, since);
      for (const c of charts) c.extend(fresh);
      for (const p of panels) if (p.live) await p.draw();
      if (now.status !== "running") clearInterval(timer);
    } catch (e) { console.warn(e); }
  }, POLL_MS);
}

function moePanel(id, experts) {
  const box = el("div", { id: "moe" });
  MAIN.append(el("h2", { text: "Experts: load share per layer over steps, and router bias" }), box);
  return {
    live: true,
    async draw() {
      box.replaceChildren();
      for (const kind of ["load", "bias"]) {
        if (!(experts[kind] || []).length) continue;
        const points = Math.max(10, (widthOf(box) / 2) | 0);
        const m = await getJSON(`/api/runs/${encodeURIComponent(id)}/experts?` + qs([["kind", kind], ["points", points]]));
        for (const [layer, mat] of Object.entries(m.layers)) {
          const node = el("div", { class: "heat", id: `heat-${kind}-l${layer}` });
          box.append(node);
          node.dataset.experts = String(mat.experts.length);
          node.dataset.steps = String(mat.steps.length);
          await Plotly.newPlot(node, [{ type: "heatmap", x: mat.steps, y: mat.experts.map((e) => "e" + e), z: mat.z,
            colorscale: kind === "load" ? "Viridis" : "RdBu", zmid: kind === "bias" ? 0 : undefined,
            colorbar: { title: { text: kind === "load" ? "share" : "bias" } } }],
            { ...LAYOUT, height: 260, title: { text: `MoE layer ${layer}: expert ${kind}`, font: { size: 14 } },
              yaxis: { title: { text: "expert" } } }, { displaylogo: false, responsive: true });
        }
      }
    },
  };
}

function morphPanel(id) {
  const box = el("div", { id: "morph", class: "grid" });
  MAIN.append(el("h2", { text: "Seeds: lifecycle timeline, accuracy vs parameters" }), box);
  return {
    live: false,
    async draw() {
      const [seeds, traj] = await Promise.all([
        getJSON(`/api/runs/${encodeURIComponent(id)}/seeds`),
        getJSON(`/api/runs/${encodeURIComponent(id)}/series?` + qs([["name", "params"], ["name", "val_acc"]])),
      ]);
      const tl = el("div", { class: "chart", id: "timeline" });
      const acc = el("div", { class: "chart", id: "acc-params" });
      box.replaceChildren(tl, acc);
      const t = seeds.timeline;
      if (!t) {
        tl.append(el("p", { class: "note", text: "no seed timeline yet (written to report.json when the run ends)" }));
      } else {
        const traces = new Map();
        for (const s of t.seeds) for (const span of s.spans) {
          if (!traces.has(span.state)) traces.set(span.state, { type: "bar", orientation: "h", name: span.state,
            x: [], y: [], base: [], marker: { color: STATE_COLORS[span.state] || "#888" } });
          const tr = traces.get(span.state);
          tr.x.push(Math.max(span.end - span.start, 0.15)); tr.y.push(s.seed); tr.base.push(span.start);
        }
        tl.dataset.seeds = String(t.seeds.length);
        tl.dataset.states = [...traces.keys()].join(",");
        await Plotly.newPlot(tl, [...traces.values()], { ...LAYOUT, barmode: "overlay",
          title: { text: "seed states over epochs", font: { size: 14 } }, xaxis: { title: { text: "epoch" } } },
          { displaylogo: false, responsive: true });
      }
      const p = traj.series.params, a = traj.series.val_acc;
      const data = [];
      if (p && a) {
        const bySteps = new Map(p.step.map((s, i) => [s, p.value[i]]));
        const xs = [], ys = [], txt = [];
        a.step.forEach((s, i) => { if (bySteps.has(s)) { xs.push(bySteps.get(s)); ys.push(a.value[i]); txt.push("epoch " + s); } });
        data.push({ x: xs, y: ys, text: txt, mode: "lines+markers", name: "this run by epoch", line: { color: COLORS[0] } });
      }
      const peers = seeds.peers.filter((q) => q.run !== id);
      if (peers.length) data.push({ x: peers.map((q) => q.params), y: peers.map((q) => q.val_acc),
        text: peers.map((q) => q.run), mode: "markers", name: "other morph runs (last epoch)",
        marker: { color: COLORS[1], size: 9, symbol: "diamond" } });
      acc.dataset.points = String(data.reduce((n, d) => n + d.x.length, 0));
      await Plotly.newPlot(acc, data, { ...LAYOUT, title: { text: "validation accuracy vs parameters", font: { size: 14 } },
        xaxis: { title: { text: "parameters" } }, yaxis: { title: { text: "val_acc" } } },
        { displaylogo: false, responsive: true });
    },
  };
}

function screenerPanel(id) {
  const box = el("div", { id: "screener" });
  MAIN.append(el("h2", { text: "Screener: live top-K and latency" }), box);
  return {
    live: true,
    async draw() {
      const s = await getJSON(`/api/runs/${encodeURIComponent(id)}/screener`);
      if (!s.live) { box.replaceChildren(el("p", { class: "note", text: "no status.json in this run" })); return; }
      const top = s.live.top || [];
      box.replaceChildren(
        el("p", { class: "meta", text: `p95 frame→decision ${fmt(s.live.p95_latency_ms)} ms · snapshots ${fmt(s.live.snapshots)}` }),
        el("table", { id: "topk" }, el("tr", {}, el("th", { text: "rank" }), el("th", { text: "symbol" }), el("th", { text: "score" })),
          ...top.map((r) => el("tr", {}, el("td", { text: String(r.rank) }), el("td", { text: String(r.symbol) }),
                                 el("td", { class: "num", text: fmt(r.score) })))));
    },
  };
}

function artifactsPanel(id) {
  const box = el("div", { id: "artifacts" });
  return {
    live: false,
    async draw() {
      const a = await getJSON(`/api/runs/${encodeURIComponent(id)}/artifacts`);
      if (!a.tables.length && !a.images.length) return;
      if (!box.isConnected) MAIN.append(el("h2", { text: "Evaluation and report" }), box);
      box.replaceChildren();
      for (const t of a.tables) {
        box.append(el("h3", { text: t.file }), el("table", { class: "eval" },
          el("tr", {}, ...t.columns.map((c) => el("th", { text: c }))),
          ...t.rows.map((r) => el("tr", {}, ...r.map((v) => el("td", { class: typeof v === "number" ? "num" : "", text: fmt(v) }))))));
      }
      const imgs = el("div", { class: "images" });
      for (const path of a.images) {
        imgs.append(el("figure", {}, el("img", { class: "report", alt: path,
          src: `/api/runs/${encodeURIComponent(id)}/files/${path.split("/").map(encodeURIComponent).join("/")}` }),
          el("figcaption", { class: "meta", text: path })));
      }
      box.append(imgs);
    },
  };
}

// ---------------------------------------------------------------- comparison
const PREFERRED = ["loss", "train_loss", "val/loss", "val_loss", "val_acc", "val/bpb", "lm_loss", "grad_norm",
                   "perf/tokens_per_s", "perf/mfu"];

async function comparePage() {
  const c = await getJSON("/api/compare?" + qs(PAGE.runs.map((r) => ["run", r])));
  MAIN.append(el("h1", { text: `Comparing ${c.runs.length} runs` }));
  MAIN.append(el("table", { id: "compare-runs" }, el("tr", {}, ...["", "run", "system", "name", "status"].map((h) => el("th", { text: h }))),
    ...c.runs.map((r, i) => el("tr", {}, el("td", {}, el("span", { style: `color:${COLORS[i % COLORS.length]}`, text: "■" })),
      el("td", {}, el("a", { href: "/runs/" + encodeURIComponent(r.id), text: r.id })), el("td", { text: r.system }),
      el("td", { text: r.name }), el("td", {}, badge(r.status))))));
  const grid = el("div", { class: "grid", id: "overlays" });
  MAIN.append(el("h2", { text: "Curves (overlaid)" }), grid);
  const shown = PREFERRED.filter((n) => c.common.includes(n)).slice(0, 4);
  const rest = c.common.filter((n) => !PER_EXPERT.test(n) && !shown.includes(n));
  if (!shown.length && rest.length) shown.push(rest.shift());
  if (!shown.length) grid.append(el("p", { class: "note", text: "the runs have no metric in common" }));
  const label = (r) => r.name + " · " + r.id.slice(-4);
  for (const name of shown) {
    const node = el("div", { class: "chart", id: "overlay-" + name.replace(/[^A-Za-z0-9]/g, "_") });
    grid.append(node);
    await new LineChart(node, name, c.runs.map((r) => ({ run: r.id, name, label: label(r) }))).draw();
  }
  if (rest.length) {
    const pick = el("select", { id: "pick-common" }, ...rest.map((n) => el("option", { value: n, text: n })));
    const node = el("div", { class: "chart", id: "overlay-other" });
    grid.append(el("div", {}, el("label", { class: "meta" }, "other metric: ", pick), node));
    const draw = () => new LineChart(node, pick.value, c.runs.map((r) => ({ run: r.id, name: pick.value, label: label(r) }))).draw();
    pick.onchange = draw;
    await draw();
  }
  MAIN.append(el("h2", { text: `Config differences (${c.diff.length} of ${c.keys} keys)` }));
  MAIN.append(el("table", { id: "config-diff" },
    el("tr", {}, el("th", { text: "key" }), ...c.runs.map((r) => el("th", { text: label(r) }))),
    ...c.diff.map((d) => el("tr", {}, el("td", { text: d.key }), ...d.values.map((v) => el("td", { text: v }))))));
  document.body.dataset.ready = "1";
}

const PAGES = { runs: runsPage, run: runPage, compare: comparePage };
PAGES[PAGE.page]().catch((e) => {
  MAIN.append(el("p", { class: "error", id: "page-error", text: "error: " + e.message }));
  document.body.dataset.ready = "error";
});
