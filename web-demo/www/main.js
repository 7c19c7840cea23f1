// The demo page: generates a structured input, runs NSA and dense attention on WebGPU through
// the wasm API, and draws the attention pattern. Also exposes the API as window.nsaWgpu.
import init, { NsaSession } from "./pkg/nsa_web.js";

const $ = (id) => document.getElementById(id);
const HQ = 4, HKV = 1, D = 32;

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

// A seeded generator (mulberry32) and normal samples (Box-Muller).
function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const normal = () => Math.sqrt(-2 * Math.log(next() + 1e-12)) * Math.cos(2 * Math.PI * next());
  return { next, normal };
}

// Keys in each needle's burst (generate), which the overview marks (drawOverview).
const NEEDLE_KEYS = 16;

// Random keys and queries, plus `needles` planted keys: a burst of NEEDLE_KEYS keys along
// one direction, and later queries (every third position, out of the needle's window)
// pointing at one needle.
function generate({ t, hq = HQ, hkv = HKV, dk = D, dv = D, needles = 6, seed = 1 }) {
  const r = rng(seed);
  const fill = (n, s) => Float32Array.from({ length: n }, () => r.normal() * s);
  const q = fill(t * hq * dk, 0.3), k = fill(t * hkv * dk, 0.3), v = fill(t * hkv * dv, 1);
  const gates = Float32Array.from({ length: t * hq * 3 }, () => 1 / (1 + Math.exp(-r.normal())));
  const planted = [];
  for (let n = 0; n < needles; n++) {
    const pos = Math.floor(r.next() * t * 0.7);
    const dir = Array.from({ length: dk }, () => r.normal());
    const norm = Math.hypot(...dir);
    planted.push({ pos, dir: dir.map((x) => x / norm) });
    for (let s = pos; s < Math.min(t, pos + NEEDLE_KEYS); s++)
      for (let h = 0; h < hkv; h++)
        for (let e = 0; e < dk; e++) k[(s * hkv + h) * dk + e] = planted[n].dir[e] * 6;
  }
  for (let p = 0; p < t; p += 3) {
    const n = (p * 7919) % needles;
    if (p < planted[n].pos + 600) continue;
    for (let h = 0; h < hq; h++)
      for (let e = 0; e < dk; e++) q[(p * hq + h) * dk + e] = planted[n].dir[e] * 6;
  }
  return { t, hq, hkv, dk, dv, q, k, v, gates, planted };
}

let session = null, input = null, result = null, layout = null, adapterText = "";

// The browser's own description of its WebGPU adapter (wgpu's is terse on the web).
async function describeAdapter() {
  const a = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!a) return "no WebGPU adapter";
  const i = a.info || {};
  const words = [i.vendor, i.architecture, i.device, i.description].filter((w) => w);
  return `${words.join(" ") || "unnamed adapter"}${i.isFallbackAdapter ? " (software fallback adapter)" : ""}`;
}

function drawOverview() {
  // Drawn cell by cell at the canvas's own resolution (no scaled bitmaps).
  const c = $("overview"), g = c.getContext("2d");
  const nb = Math.ceil(layout.t / layout.selBlock), n = layout.topN;
  const rows = Math.min(c.height, layout.t), per = layout.t / rows;
  const counts = new Float32Array(rows * nb);
  for (let i = 0; i < layout.t; i++) {
    const y = Math.min(rows - 1, Math.floor(i / per));
    for (let s = 0; s < n; s++) {
      const j = result.blockIndices[(i * layout.hkv) * n + s];
      if (j >= 0) counts[y * nb + j] += 1 / per;
    }
  }
  g.fillStyle = "#ffffff";
  g.fillRect(0, 0, c.width, c.height);
  const cw = c.width / nb, ch = c.height / rows;
  for (let y = 0; y < rows; y++) {
    // Blocks the row's last query can see, in grey; then each block shaded by the share of
    // the row's queries that selected it (a block every query keeps darkest, one a few of
    // them picked light), rather than saturated, which hid which blocks every query keeps.
    const last = Math.min(layout.t, Math.ceil((y + 1) * per)) - 1;
    const seen = Math.min(nb, Math.floor(last / layout.selBlock) + 1);
    g.fillStyle = "#eceff4";
    g.fillRect(0, Math.floor(y * ch), Math.ceil(seen * cw), Math.ceil(ch));
    for (let j = 0; j < nb; j++) {
      const a = Math.min(1, counts[y * nb + j]);
      if (a <= 0) continue;
      g.fillStyle = `rgb(${236 - 206 * a}, ${239 - 149 * a}, ${244 - 54 * a})`;
      g.fillRect(Math.floor(j * cw), Math.floor(y * ch), Math.ceil(cw), Math.ceil(ch));
    }
  }
  // The blocks that hold the needles' keys (NEEDLE_KEYS from each needle's position), as
  // ticks along the bottom edge.
  g.fillStyle = "#e8871e";
  for (const p of input.planted) {
    const first = Math.floor(p.pos / layout.selBlock);
    const last = Math.floor(Math.min(layout.t - 1, p.pos + NEEDLE_KEYS - 1) / layout.selBlock);
    g.fillRect(Math.floor(first * cw), c.height - 4, Math.ceil((last - first + 1) * cw), 4);
  }
}

function bars(canvas, values, color) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const n = values.length;
  if (!n) { g.fillStyle = "#889"; g.fillText("no visible compressed token yet", 8, 20); return; }
  const max = Math.max(...values, 1e-12);
  for (let x = 0; x < w; x++) {
    const a = Math.floor((x * n) / w), b = Math.max(a + 1, Math.floor(((x + 1) * n) / w));
    let m = 0, idx = a;
    for (let i = a; i < b; i++) if (values[i] > m) { m = values[i]; idx = i; }
    g.fillStyle = color(idx);
    const bh = (m / max) * (h - 14);
    g.fillRect(x, h - bh, 1, bh);
  }
}

function inspect(query) {
  const head = Math.min(layout.hq - 1, Math.max(0, +$("head").value | 0));
  const r = session.inspect(query, head);
  const sel = new Set(Array.from(r.selected).filter((j) => j >= 0));
  $("qinfo").textContent = `query ${query} (position ${r.position}), head ${head}: ${r.pCmp.length} visible compressed tokens, ` +
    `selected blocks [${Array.from(sel).join(", ")}], window ${r.windowStart}..${r.windowEnd}`;
  bars($("pcmp"), r.pCmp, () => "#3b6fd1");
  const blocks = $("blocks");
  bars(blocks, r.groupScores, (j) => (sel.has(j) ? "#e8871e" : "#9aa3b5"));
  const g = blocks.getContext("2d"), nb = r.groupScores.length;
  const x0 = (r.windowStart / layout.selBlock / nb) * blocks.width, x1 = ((r.windowEnd + 1) / layout.selBlock / nb) * blocks.width;
  g.fillStyle = "#3b6fd1"; g.fillRect(x0, 2, Math.max(2, x1 - x0), 6);
  $("gates").innerHTML = ["compressed", "selected", "window"].map((name, i) =>
    `<div class="gate">${name} ${r.gates[i].toFixed(2)}<span style="width:${(r.gates[i] * 100).toFixed(0)}%"></span></div>`).join("");
  return r;
}

function facts(list) {
  $("facts").innerHTML = list.map(([a, b]) => `<div>${a}</div><div>${b}</div>`).join("");
}

async function runDemo() {
  const t = +$("length").value, needles = +$("needles").value | 0;
  $("run").disabled = true; $("decode").disabled = true;
  try {
    setState("running", `generating ${t} tokens…`);
    input = generate({ t, needles: Math.max(1, needles) });
    session = await NsaSession.create({ t, hq: HQ, hkv: HKV, dk: D, dv: D });
    layout = session.layout();
    setState("running", "running NSA on WebGPU…");
    result = await session.run(input.q, input.k, input.v, input.gates);
    setState("running", "running dense attention for comparison…");
    const dense = await session.dense(input.q, input.k, input.v);
    let nsaKeys = 0;
    for (let i = 0; i < t; i++) {
      const nv = i + 1 >= layout.cmpBlock ? Math.floor((i + 1 - layout.cmpBlock) / layout.cmpStride) + 1 : 0;
      let slc = 0;
      for (let s = 0; s < layout.topN; s++) {
        const j = result.blockIndices[i * layout.hkv * layout.topN + s];
        if (j >= 0) slc += Math.min(layout.selBlock, i + 1 - j * layout.selBlock);
      }
      nsaKeys += nv + slc + Math.min(layout.window, i + 1);
    }
    facts([
      ["adapter", `${adapterText} — ${session.adapterInfo()}`],
      ["shape", `T=${t}, Hq=${HQ}, Hkv=${HKV}, D=${D}; l=${layout.cmpBlock}, d=${layout.cmpStride}, l'=${layout.selBlock}, n=${layout.topN}, w=${layout.window}`],
      ["NSA", `${result.ms.toFixed(1)} ms (upload, compute, readback)`],
      ["dense attention", `${dense.ms.toFixed(1)} ms on the same input (${(dense.ms / result.ms).toFixed(2)}× NSA)`],
      ["keys per query", `${(nsaKeys / t).toFixed(0)} for NSA, ${((t + 1) / 2).toFixed(0)} for dense`],
      ["needles", input.planted.map((p) => `${p.pos} (block ${Math.floor(p.pos / layout.selBlock)})`).join(", ")],
    ]);
    drawOverview();
    // Start with the last query that looks for a needle (if any), else the last query.
    let start = t - 1;
    for (let p = t - 1; p >= 0; p--) {
      const n = (p * 7919) % input.planted.length;
      if (p % 3 === 0 && p >= input.planted[n].pos + 600) { start = p; break; }
    }
    inspect(start);
    $("decode").disabled = false;
    setState("done", "done: click the overview to inspect a query");
  } catch (e) {
    setState("error", `error: ${e.message || e}`);
    throw e;
  } finally {
    $("run").disabled = false;
  }
}

async function decodeDemo() {
  const steps = 32, start = layout.t - steps;
  session.resetCache();
  const rows = (a, width, from, to) => a.subarray(from * width, to * width);
  const first = await session.decodeStep(rows(input.q, HQ * D, 0, start), rows(input.k, HKV * D, 0, start),
    rows(input.v, HKV * D, 0, start), rows(input.gates, HQ * 3, 0, start));
  let total = 0, worst = 0;
  for (let p = start; p < layout.t; p++) {
    const r = await session.decodeStep(rows(input.q, HQ * D, p, p + 1), rows(input.k, HKV * D, p, p + 1),
      rows(input.v, HKV * D, p, p + 1), rows(input.gates, HQ * 3, p, p + 1));
    total += r.ms;
    const want = rows(result.out, HQ * D, p, p + 1);
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(want[i] - r.out[i]));
  }
  setState("done", `decode: prefill of ${start} tokens in ${first.ms.toFixed(1)} ms, then ${steps} steps at ` +
    `${(total / steps).toFixed(1)} ms each; max difference from the prefill rows ${worst.toExponential(1)}`);
}

window.nsaWgpu = {
  ready: null,
  NsaSession,
  createSession: (opts) => NsaSession.create(opts),
  generate,
  runDemo,
  inspect: (query) => inspect(query),
  last: () => ({ input, result, layout }),
  // Runs one NSA call in a module Web Worker (worker.js); rejects with the library's message.
  runInWorker: (opts, q, k, v, gates) =>
    new Promise((resolve, reject) => {
      const w = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
      w.onmessage = (ev) => {
        w.terminate();
        if (ev.data.ok) resolve(ev.data);
        else reject(new Error(ev.data.error));
      };
      w.onerror = (e) => {
        w.terminate();
        reject(new Error(e.message || "worker failed"));
      };
      w.postMessage({ opts, q, k, v, gates });
    }),
};

window.nsaWgpu.ready = (async () => {
  if (!navigator.gpu) {
    setState("error", "WebGPU is not available in this browser (navigator.gpu is missing): use a recent Chrome or Edge, or Firefox/Safari with WebGPU enabled.");
    throw new Error("no WebGPU");
  }
  await init();
  adapterText = await describeAdapter();
  $("run").onclick = () => runDemo().catch(console.error);
  $("decode").onclick = () => decodeDemo().catch((e) => setState("error", `error: ${e.message || e}`));
  $("overview").onclick = (ev) => {
    if (!result) return;
    const c = ev.target, rect = c.getBoundingClientRect();
    const y = Math.floor(((ev.clientY - rect.top) / rect.height) * layout.t);
    inspect(Math.min(layout.t - 1, Math.max(0, y)));
  };
  setState("ready", "ready");
})();
