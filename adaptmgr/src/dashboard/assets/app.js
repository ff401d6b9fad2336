// Viola's dashboard. No framework and no build step: the overview arrives as JSON (first by
// fetch, then as server-sent events whenever it changes), the plots' history by fetch. Every
// text from the server goes into the page as text nodes, never as markup.
"use strict";

let overview = null;
let historyTimer = null;
const PALETTE = ["#6d3fc0", "#0e8a7d", "#d9480f", "#1c7ed6", "#c2255c", "#5c940d", "#e67700", "#495057", "#862e9c", "#0b7285"];

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

const fmt = {
  ago(ms) {
    if (!ms) return "–";
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 60) return `${s.toFixed(0)} s ago`;
    if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  },
  dur(ms) { return ms === null || ms === undefined ? "–" : ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`; },
  bytes(b) {
    if (b === null || b === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return `${b.toFixed(i ? 1 : 0)} ${u[i]}`;
  },
  time(ms, seconds = false) {
    return new Date(ms).toLocaleTimeString([], seconds ? { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false } : { hour: "2-digit", minute: "2-digit", hour12: false });
  },
  // "Run(AnnounceMove)" -> "announce move": the driver's step names, for people.
  step(s) { return (s || "starting").replace(/^Run\((.*)\)$/, "$1").replace(/([a-z])([A-Z])/g, "$1 $2").toLowerCase(); },
  num(v, d = 2) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); },
};

function state(s) { return typeof s === "string" ? s : Object.keys(s || { unknown: 1 })[0]; }

function meter(label, value, max, unit) {
  const frac = max > 0 ? Math.min(1, value / max) : 0;
  const fill = h("div", { class: frac > 0.9 ? "fill hot" : "fill" });
  fill.style.width = `${(frac * 100).toFixed(1)}%`;
  return h("div", { class: "meter" }, `${label}: ${fmt.num(value)} of ${fmt.num(max)} ${unit}`, h("div", { class: "bar" }, fill));
}

function renderFederation(o) {
  const sites = document.getElementById("sites");
  sites.replaceChildren(...o.sites.map(site => h("div", { class: "site card", "data-site": site.name },
    h("h3", {}, `Site ${site.name}`, h("span", { class: "badge" }, `${site.hosts.length} hosts`)),
    h("div", { class: "cards" }, site.hosts.map(host => {
      const st = state(host.state);
      const u = host.usage;
      const vms = o.vms.filter(v => v.host === host.name);
      const cap = u ? (u.cpu_capacity ?? u.cpus) : host.cpus;
      return h("div", { class: "card", "data-host": host.name },
        h("h3", {}, host.name, h("span", { class: `badge ${st}` }, st)),
        u ? meter("CPU", u.cpu_busy, cap, "CPUs") : h("p", { class: "empty" }, "no report yet"),
        u ? meter("Memory", (u.mem_total_kib - u.mem_available_kib) / 1048576, u.mem_total_kib / 1048576, "GiB") : null,
        h("div", { class: "note" }, vms.length ? `VMs: ${vms.map(v => v.name).join(", ")}` : "no VMs",
          host.last_heartbeat_ms ? ` · heard ${fmt.ago(host.last_heartbeat_ms)}` : ""));
    })))));
  if (!o.sites.length) sites.replaceChildren(h("p", { class: "empty" }, "No hosts to show."));
  const links = document.querySelector("#links tbody");
  links.replaceChildren(...o.links.map(l => h("tr", { "data-link": `${l.a}-${l.b}` },
    h("td", {}, `${l.a} ↔ ${l.b}`), h("td", {}, l.migrations),
    h("td", {}, l.last_goodput_mbit_s === null ? "–" : `${fmt.num(l.last_goodput_mbit_s, 1)} Mbit/s`),
    h("td", {}, fmt.ago(l.last_ms)))));
  if (!o.links.length) links.replaceChildren(h("tr", {}, h("td", { colspan: 4, class: "empty" }, "One site: no WAN links.")));
  const p = o.policy;
  document.getElementById("policy").textContent = p ? `Policy ${p.policy}, mode ${p.mode}, every ${p.period_s} s.` : "";
}

function renderViolins(o) {
  const list = document.getElementById("violin-list");
  const byName = Object.fromEntries(o.vms.map(v => [v.name, v]));
  const moving = new Set(o.migrations_in_flight.map(m => m.vm));
  list.replaceChildren(...o.violins.map(v => h("div", { class: "violin", "data-violin": v.name },
    h("h3", {}, v.name),
    h("div", { class: "meta" }, `subnet ${v.subnet ?? "–"} · VNI ${v.id} · sites ${v.sites.length ? v.sites.join(", ") : "all"}`,
      v.mtu ? ` · MTU ${v.mtu}` : "", v.tenant ? ` · tenant ${v.tenant}` : ""),
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["VM", "Host", "Address", "MAC", "State", "vCPUs", "CPU busy", "Memory"].map(t => h("th", {}, t)))),
      h("tbody", {}, v.vms.length ? v.vms.map(m => {
        const vm = byName[m.vm];
        const host = vm ? vm.host : m.host;
        return h("tr", { "data-vm": m.vm, "data-host": host ?? "" },
          h("td", {}, m.vm), h("td", { class: "host" }, host ?? "–", moving.has(m.vm) ? " (moving)" : ""),
          h("td", {}, m.ip ?? "–"), h("td", {}, h("code", {}, m.mac ?? "–")),
          h("td", {}, h("span", { class: `badge ${vm ? state(vm.state) : "unknown"}` }, vm ? state(vm.state) : "not seen")),
          h("td", {}, vm ? `${vm.vcpus}/${vm.max_vcpus}` : "–"), h("td", {}, vm ? fmt.num(vm.cpu_busy) : "–"),
          h("td", {}, vm ? fmt.bytes(vm.memory_kib * 1024) : "–"));
      }) : h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No VMs yet.")))))
  )));
  if (!o.violins.length) list.replaceChildren(h("p", { class: "empty" }, "No violins yet: viola violin create NAME."));
}

function renderMigrations(o) {
  const flights = document.getElementById("in-flight");
  flights.replaceChildren(...o.migrations_in_flight.map(m => {
    const job = m.status.job;
    const staging = m.status.staging;
    let frac = null;
    let detail = "";
    if (job && job.data_processed + job.data_remaining > 0) {
      // QEMU skips pages the guest never touched: what is sent plus what is left is the
      // journey, not the VM's memory size.
      frac = Math.min(1, job.data_processed / (job.data_processed + job.data_remaining));
      detail = `${fmt.bytes(job.data_processed)} sent · ${fmt.bytes(job.data_remaining)} left`;
    } else if (staging && staging.bytes_total > 0) {
      frac = Math.min(1, staging.bytes_done / staging.bytes_total);
      detail = `staging by ${staging.by}: ${staging.state}, ${fmt.bytes(staging.bytes_done)} of ${fmt.bytes(staging.bytes_total)}`;
    }
    const bar = h("progress", { max: 100 });
    if (frac !== null) bar.value = (frac * 100).toFixed(1);
    return h("div", { class: "flight", "data-migrating": m.vm },
      h("strong", {}, `${m.vm}: ${m.from} → ${m.to}`),
      h("span", { class: "note" }, ` · started ${fmt.ago(m.started_ms)}`),
      bar,
      h("div", { class: "step" }, `${fmt.step(m.status.step)}${frac !== null ? ` · ${(frac * 100).toFixed(0)} %` : ""}${detail ? ` · ${detail}` : ""}`));
  }));
  if (!o.migrations_in_flight.length) flights.replaceChildren(h("p", { class: "empty" }, "No migration runs now."));
  const recent = document.querySelector("#recent tbody");
  recent.replaceChildren(...o.migrations_recent.map(m => h("tr", { "data-migration": m.vm, id: `migration-${m.vm}-${m.finished_ms}` },
    h("td", {}, m.vm), h("td", {}, `${m.from} → ${m.to}`),
    h("td", {}, h("span", { class: `badge ${m.outcome}`, title: m.reason ?? "" }, m.outcome.replace("_", " ")), m.reason ? h("div", { class: "note" }, m.reason) : null),
    h("td", {}, fmt.dur(m.finished_ms - m.started_ms)), h("td", {}, fmt.dur(m.downtime_ms)), h("td", {}, fmt.bytes(m.bytes)),
    h("td", {}, m.decision ? h("a", { class: "ref", href: `#decision-${m.decision}` }, `decision #${m.decision}`) : "operator"),
    h("td", {}, fmt.ago(m.finished_ms)))));
  if (!o.migrations_recent.length) recent.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "None yet.")));
}

function renderDecisions(o) {
  const list = document.getElementById("decision-list");
  list.replaceChildren(...o.decisions.map(d => h("div", { class: "decision", id: `decision-${d.seq}`, "data-decision": d.seq },
    h("div", { class: "head" }, h("strong", {}, `#${d.seq}`), fmt.ago(d.ts_ms), `${d.policy} (${d.mode})`,
      `${d.state.hosts_up}/${d.state.hosts} hosts up`, `${d.state.vms} VMs`, `mean demand ${fmt.num(d.state.mean_demand * 100, 0)} %`,
      d.state.hosts_overloaded ? `${d.state.hosts_overloaded} overloaded` : ""),
    d.actions.length ? h("ul", {}, d.actions.map(a => {
      const outcome = a.outcome.outcome;
      const moved = a.outcome.moved;
      const target = a.vm && o.migrations_recent.find(m => m.vm === a.vm && m.decision === d.seq);
      return h("li", {}, h("span", { class: `badge ${outcome}` }, outcome), " ",
        `${a.action} ${a.vm ?? ""}${a.from ? ` ${a.from}` : ""}${a.to ? ` → ${a.to}` : ""}${a.detail ? ` (${a.detail})` : ""}: ${a.reason}`,
        moved ? ` · took ${fmt.dur(moved.time_ms)}, downtime ${fmt.dur(moved.downtime_ms)}` : "",
        a.outcome.error ? ` · ${a.outcome.error}` : "",
        target ? h("a", { class: "ref", href: `#migrations` }, " · see migration") : null);
    })) : h("div", { class: "note" }, "Nothing to do."))));
  if (!o.decisions.length) list.replaceChildren(h("p", { class: "empty" }, "No decisions recorded (the policy loop is off, or has not run yet)."));
}

function render() {
  const o = overview;
  if (!o) return;
  const admin = o.viewer.tenant === null;
  document.getElementById("who").textContent = admin ? `${o.viewer.identity} (administrator)` : `${o.viewer.identity} (tenant ${o.viewer.tenant})`;
  for (const a of document.querySelectorAll("nav a[data-admin]")) a.hidden = !admin;
  if (admin) { renderFederation(o); renderDecisions(o); }
  renderViolins(o);
  renderMigrations(o);
  showTab();
}

function showTab() {
  const admin = overview && overview.viewer.tenant === null;
  let tab = location.hash.replace(/^#/, "").split("-")[0];
  if (tab === "decision") tab = "decisions";
  const valid = ["violins", "migrations", "plots"].concat(admin ? ["federation", "decisions"] : []);
  if (!valid.includes(tab)) tab = admin ? "federation" : "violins";
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== tab;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === tab);
  if (tab === "plots") { if (!historyTimer) { loadHistory(); historyTimer = setInterval(loadHistory, 10000); } }
  else if (historyTimer) { clearInterval(historyTimer); historyTimer = null; }
}

// ---- plots ----

function lineChart(title, series, unit, opts = {}) {
  const W = 560, H = 220, L = 46, R = 10, T = 10, B = 26;
  const all = series.flatMap(s => s.points);
  const box = h("div", { class: "chart", "data-chart": title }, h("h3", {}, title, h("span", { class: "note" }, ` (${unit})`)));
  if (!all.length) { box.append(h("p", { class: "empty" }, "No samples yet.")); return box; }
  const t0 = Math.min(...all.map(p => p[0])), t1 = Math.max(...all.map(p => p[0]), t0 + 1);
  const vmax = Math.max(opts.min ?? 0, ...all.map(p => p[1])) * 1.1 || 1;
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = v => T + (1 - v / vmax) * (H - T - B);
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const v = vmax * i / 4;
    g.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e6eb" }),
      svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, fmt.num(v, vmax < 0.1 ? 3 : vmax < 1 ? 2 : vmax < 10 ? 1 : 0)));
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + (t1 - t0) * i / 4;
    g.append(svg("text", { x: x(t), y: H - 8, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, fmt.time(t, t1 - t0 < 600000)));
  }
  const legend = h("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    g.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": 1.6, "stroke-dasharray": s.dashed ? "4 3" : "none" }));
    const sw = h("i"); sw.style.background = color;
    legend.append(h("span", {}, sw, s.label));
  });
  box.append(g, legend);
  return box;
}

function barChart(title, bars, unit) {
  const W = 560, H = 180, L = 36, R = 10, T = 10, B = 26;
  const box = h("div", { class: "chart", "data-chart": title }, h("h3", {}, title, h("span", { class: "note" }, ` (${unit})`)));
  const vmax = Math.max(1, ...bars.map(b => b[1]));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const bw = (W - L - R) / Math.max(1, bars.length);
  bars.forEach((b, i) => {
    const bh = b[1] / vmax * (H - T - B);
    g.append(svg("rect", { x: L + i * bw + 1, y: H - B - bh, width: Math.max(1, bw - 2), height: bh, fill: PALETTE[0] }));
    if (i % 4 === 0) g.append(svg("text", { x: L + i * bw + bw / 2, y: H - 8, "text-anchor": "middle" }, fmt.time(b[0])));
  });
  g.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, vmax));
  box.append(g);
  return box;
}

function timeline(title, placements, t1) {
  const byVm = {};
  for (const p of placements) (byVm[p.vm] ||= []).push(p);
  const vms = Object.keys(byVm).sort();
  const hosts = [...new Set(placements.map(p => p.host))].sort();
  const box = h("div", { class: "chart", "data-chart": title }, h("h3", {}, title));
  if (!vms.length) { box.append(h("p", { class: "empty" }, "No placements yet.")); return box; }
  const W = 560, L = 90, R = 10, row = 20, H = vms.length * row + 30;
  const t0 = Math.min(...placements.map(p => p.since_ms));
  const x = t => L + (Math.max(t, t0) - t0) / Math.max(1, t1 - t0) * (W - L - R);
  const color = host => PALETTE[hosts.indexOf(host) % PALETTE.length];
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  vms.forEach((vm, i) => {
    g.append(svg("text", { x: L - 6, y: i * row + 14, "text-anchor": "end" }, vm));
    byVm[vm].forEach((p, j) => {
      const end = j + 1 < byVm[vm].length ? byVm[vm][j + 1].since_ms : t1;
      g.append(svg("rect", { x: x(p.since_ms), y: i * row + 3, width: Math.max(1, x(end) - x(p.since_ms)), height: row - 6, fill: color(p.host), "data-vm": vm, "data-host": p.host },
        svg("title", {}, `${vm} on ${p.host} from ${fmt.time(p.since_ms)}`)));
    });
  });
  const short = t1 - t0 < 600000;
  g.append(svg("text", { x: L, y: H - 6 }, fmt.time(t0, short)), svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, fmt.time(t1, short)));
  const legend = h("div", { class: "legend" }, hosts.map(host => { const sw = h("i"); sw.style.background = color(host); return h("span", {}, sw, host); }));
  box.append(g, legend);
  return box;
}

function seriesOf(hist, re, label) {
  return hist.series.filter(s => re.test(s.name)).map(s => ({ label: label(s.name.match(re)), points: s.points }));
}

async function loadHistory() {
  const range = document.getElementById("range").value;
  let hist;
  try {
    const r = await fetch(`/api/v1/history?range=${range}`);
    if (!r.ok) throw new Error(await r.text());
    hist = await r.json();
  } catch (e) {
    document.getElementById("charts").replaceChildren(h("p", { class: "empty" }, `Cannot load the history: ${e.message}`));
    return;
  }
  const charts = [];
  const hostCpu = seriesOf(hist, /^host\/([^/]+)\/cpu$/, m => m[1]);
  const hostCap = seriesOf(hist, /^host\/([^/]+)\/cpu_capacity$/, m => `${m[1]} capacity`).map(s => ({ ...s, dashed: true }));
  hostCpu.forEach((s, i) => { s.color = PALETTE[i % PALETTE.length]; const c = hostCap.find(c => c.label === `${s.label} capacity`); if (c) c.color = s.color; });
  if (hostCpu.length) charts.push(lineChart("Host CPU", hostCpu.concat(hostCap), "CPUs"));
  charts.push(lineChart("VM CPU", seriesOf(hist, /^vm\/([^/]+)\/cpu$/, m => m[1]), "vCPUs busy"));
  const hostMem = seriesOf(hist, /^host\/([^/]+)\/mem_used_mib$/, m => m[1]);
  if (hostMem.length) charts.push(lineChart("Host memory used", hostMem, "MiB"));
  charts.push(lineChart("VM memory", seriesOf(hist, /^vm\/([^/]+)\/mem_mib$/, m => m[1]), "MiB"));
  const violin = seriesOf(hist, /^host\/([^/]+)\/net\/(vio[0-9]+)\/(rx|tx)_mbit_s$/, m => `${m[1]} ${m[2]} ${m[3]}`);
  if (violin.length) charts.push(lineChart("Violin traffic (each host's violin bridge)", violin, "Mbit/s"));
  // Everything but the violins' own devices (bridges vioN, the overlay's TAPs vioNt).
  const wan = hist.series.filter(s => /^host\/[^/]+\/net\/[^/]+\/(rx|tx)_mbit_s$/.test(s.name) && !/\/net\/vio[0-9]+t?\//.test(s.name))
    .map(s => { const m = s.name.match(/^host\/([^/]+)\/net\/([^/]+)\/(rx|tx)/); return { label: `${m[1]} ${m[2]} ${m[3]}`, points: s.points }; });
  if (wan.length) charts.push(lineChart("Underlay traffic (overlay peers and migrations)", wan, "Mbit/s"));
  const links = seriesOf(hist, /^host\/([^/]+)\/link\/([^/]+)\/tx_mbit_s$/, m => `${m[1]} → ${m[2].replace(":", "/")}`);
  if (links.length) charts.push(lineChart("Overlay traffic per peer link (sent)", links, "Mbit/s"));
  charts.push(barChart("Migrations per hour", hist.migrations_per_hour, "moves"));
  charts.push(timeline("Where each VM ran", hist.placements, Date.now()));
  document.getElementById("charts").replaceChildren(...charts);
}

// ---- data ----

async function loadOverview() {
  const r = await fetch("/api/v1/overview");
  if (!r.ok) throw new Error(`${r.status}: ${await r.text()}`);
  overview = await r.json();
  render();
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/v1/events");
  es.addEventListener("open", () => live.classList.add("on"));
  es.addEventListener("overview", ev => { overview = JSON.parse(ev.data); render(); });
  es.addEventListener("error", () => live.classList.remove("on"));
}

window.addEventListener("hashchange", showTab);
// "… s ago" stays true between changes.
setInterval(render, 5000);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("range").addEventListener("change", loadHistory);
  loadOverview().catch(e => { document.getElementById("who").textContent = `cannot load: ${e.message}`; });
  connect();
});
