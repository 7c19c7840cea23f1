// Browser test: serves web-demo/www, loads it in headless Chromium (WebGPU on SwiftShader;
// playwright gives it a fresh profile),
// runs NSA through the page's API on a small input and checks `out` and `blockIndices`
// against the CPU reference compiled into the same wasm, runs the same call in a Web Worker,
// checks decode steps against the
// prefill rows, the `precision` option, Linear compression, per-branch keys and values and
// packed sequences, then runs the demo UI, saves a screenshot of the rendered pattern
// (test/screenshot.png) and fails if the page logged an error.
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const port = process.env.PORT || "8765";
const url = `http://127.0.0.1:${port}/`;
const server = spawn("python3", ["-m", "http.server", "--bind", "127.0.0.1", port], {
  cwd: join(here, "..", "www"),
  stdio: "ignore",
});
const fail = (msg) => {
  console.error(`browser test FAILED: ${msg}`);
  process.exitCode = 1;
};

async function waitForServer() {
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(url)).ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`server at ${url} did not start`);
}

let browser;
try {
  await waitForServer();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--no-sandbox", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = await browser.newPage({ viewport: { width: 860, height: 1100 } });
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(url);
  await page.waitForFunction(() => ["ready", "error"].includes(document.body.dataset.state), null, { timeout: 120000 });
  const state = await page.evaluate(() => [document.body.dataset.state, document.getElementById("status").textContent]);
  if (state[0] !== "ready") throw new Error(`page not ready: ${state[1]}`);

  const api = await page.evaluate(async () => {
    const shape = { t: 200, hq: 4, hkv: 2, dk: 16, dv: 12 };
    const s = await window.nsaWgpu.createSession({ ...shape, cmpBlock: 16, cmpStride: 8, selBlock: 32, topN: 5, window: 40 });
    const inp = window.nsaWgpu.generate({ ...shape, needles: 3, seed: 7 });
    const gpu = await s.run(inp.q, inp.k, inp.v, inp.gates);
    const ref = s.reference(inp.q, inp.k, inp.v, inp.gates);
    let worst = 0, nan = 0, mismatches = 0;
    for (let i = 0; i < ref.out.length; i++) {
      if (Number.isNaN(gpu.out[i])) nan++;
      worst = Math.max(worst, Math.abs(gpu.out[i] - ref.out[i]));
    }
    for (let i = 0; i < ref.blockIndices.length; i++) if (gpu.blockIndices[i] !== ref.blockIndices[i]) mismatches++;
    // Decode: 150 tokens at once, then one at a time, then from 155 again after a
    // truncation; rows must match the prefill.
    const rows = (a, w, from, to) => a.subarray(from * w, to * w);
    await s.decodeStep(rows(inp.q, 64, 0, 150), rows(inp.k, 32, 0, 150), rows(inp.v, 24, 0, 150), rows(inp.gates, 12, 0, 150));
    let decodeWorst = 0;
    for (let p = 150; p < 160; p++) {
      const r = await s.decodeStep(rows(inp.q, 64, p, p + 1), rows(inp.k, 32, p, p + 1), rows(inp.v, 24, p, p + 1), rows(inp.gates, 12, p, p + 1));
      for (let i = 0; i < 48; i++) decodeWorst = Math.max(decodeWorst, Math.abs(r.out[i] - gpu.out[p * 48 + i]));
    }
    // Rolled back to 155 tokens, the same tokens again give the same rows.
    s.truncateCache(155);
    for (let p = 155; p < 160; p++) {
      const r = await s.decodeStep(rows(inp.q, 64, p, p + 1), rows(inp.k, 32, p, p + 1), rows(inp.v, 24, p, p + 1), rows(inp.gates, 12, p, p + 1));
      if (r.length !== p + 1) decodeWorst = Infinity;
      for (let i = 0; i < 48; i++) decodeWorst = Math.max(decodeWorst, Math.abs(r.out[i] - gpu.out[p * 48 + i]));
    }
    let rejected = "";
    try { await s.run(inp.q.subarray(1), inp.k, inp.v, inp.gates); } catch (e) { rejected = String(e.message || e); }
    // The same call in a Web Worker.
    const w = await window.nsaWgpu.runInWorker({ ...shape, cmpBlock: 16, cmpStride: 8, selBlock: 32, topN: 5, window: 40 }, inp.q, inp.k, inp.v, inp.gates);
    let workerWorst = 0, workerMismatches = 0;
    for (let i = 0; i < ref.out.length; i++) workerWorst = Math.max(workerWorst, Math.abs(w.out[i] - ref.out[i]));
    for (let i = 0; i < ref.blockIndices.length; i++) if (w.blockIndices[i] !== ref.blockIndices[i]) workerMismatches++;
    // Precision: "auto" takes f16 where the adapter has shader-f16; "f16" runs within f16's
    // tolerance there and is refused, naming the feature, where not; other values are refused.
    const opts = { ...shape, cmpBlock: 16, cmpStride: 8, selBlock: 32, topN: 5, window: 40 };
    const auto = (await window.nsaWgpu.createSession({ ...opts, precision: "auto" })).layout().precision;
    let f16 = "";
    try {
      const h = await window.nsaWgpu.createSession({ ...opts, precision: "f16" });
      const r = await h.run(inp.q, inp.k, inp.v, inp.gates);
      let hw = 0;
      for (let i = 0; i < ref.out.length; i++) hw = Math.max(hw, Math.abs(r.out[i] - ref.out[i]));
      f16 = `ran: layout says ${h.layout().precision}, max abs error ${hw}`;
      if (h.layout().precision !== "f16" || !(hw <= 1e-2)) f16 = `wrong: ${f16}`;
    } catch (e) { f16 = `refused: ${String(e.message || e)}`; }
    let bogus = "";
    try { await window.nsaWgpu.createSession({ ...opts, precision: "f64" }); } catch (e) { bogus = String(e.message || e); }
    // A block length past wasm32's usize is refused, not saturated to 2^32 - 1.
    let huge = "";
    try { await window.nsaWgpu.createSession({ ...opts, cmpBlock: 2 ** 32 }); } catch (e) { huge = String(e.message || e); }
    // Linear compression: refused without weights, then run, reference and decode steps agree.
    const lin = await window.nsaWgpu.createSession({ ...opts, compression: "linear" });
    let noWeights = "";
    try { await lin.run(inp.q, inp.k, inp.v, inp.gates); } catch (e) { noWeights = String(e.message || e); }
    let seed = 5;
    const rnd = (n, sc) => Float32Array.from({ length: n }, () => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return (seed / 2147483648 - 0.5) * sc;
    });
    const L = 16, weights = [rnd(2 * L * 16 * 16, 0.1), rnd(2 * L * 16, 1), rnd(2 * L * 12 * 12, 0.1), rnd(2 * L * 12, 1)];
    let badWeights = "", meanWeights = "";
    try { lin.setLinearWeights(weights[0].subarray(1), weights[1], weights[2], weights[3]); } catch (e) { badWeights = String(e.message || e); }
    try { s.setLinearWeights(...weights); } catch (e) { meanWeights = String(e.message || e); }
    lin.setLinearWeights(...weights);
    const lg = await lin.run(inp.q, inp.k, inp.v, inp.gates);
    const lr = lin.reference(inp.q, inp.k, inp.v, inp.gates);
    let linWorst = 0, linMismatches = 0, linDiffers = 0;
    for (let i = 0; i < lr.out.length; i++) {
      linWorst = Math.max(linWorst, Math.abs(lg.out[i] - lr.out[i]));
      if (Math.abs(lr.out[i] - ref.out[i]) > 1e-3) linDiffers++;
    }
    for (let i = 0; i < lr.blockIndices.length; i++) if (lg.blockIndices[i] !== lr.blockIndices[i]) linMismatches++;
    await lin.decodeStep(rows(inp.q, 64, 0, 150), rows(inp.k, 32, 0, 150), rows(inp.v, 24, 0, 150), rows(inp.gates, 12, 0, 150));
    for (let p = 150; p < 155; p++) {
      const r = await lin.decodeStep(rows(inp.q, 64, p, p + 1), rows(inp.k, 32, p, p + 1), rows(inp.v, 24, p, p + 1), rows(inp.gates, 12, p, p + 1));
      for (let i = 0; i < 48; i++) linWorst = Math.max(linWorst, Math.abs(r.out[i] - lg.out[p * 48 + i]));
    }
    // The selection branch's own keys and values: run = reference, both unlike the shared run.
    const own = { kSlc: rnd(200 * 32, 2), vSlc: rnd(200 * 24, 2) };
    const bg = await s.run(inp.q, inp.k, inp.v, inp.gates, own);
    const br = s.reference(inp.q, inp.k, inp.v, inp.gates, own);
    let ownWorst = 0, ownMismatches = 0, ownDiffers = 0;
    for (let i = 0; i < br.out.length; i++) {
      ownWorst = Math.max(ownWorst, Math.abs(bg.out[i] - br.out[i]));
      if (Math.abs(br.out[i] - ref.out[i]) > 1e-3) ownDiffers++;
    }
    for (let i = 0; i < br.blockIndices.length; i++) if (bg.blockIndices[i] !== br.blockIndices[i]) ownMismatches++;
    let ownBad = "", ownShort = "";
    try { await s.run(inp.q, inp.k, inp.v, inp.gates, { kWin: [1, 2] }); } catch (e) { ownBad = String(e.message || e); }
    try { await s.run(inp.q, inp.k, inp.v, inp.gates, { kWin: rnd(5, 1) }); } catch (e) { ownShort = String(e.message || e); }
    // Decode steps with them: the same rows; a cache started without them refuses them.
    s.resetCache();
    const ownRows = (a, b) => ({ kSlc: own.kSlc.subarray(a * 32, b * 32), vSlc: own.vSlc.subarray(a * 24, b * 24) });
    await s.decodeStep(rows(inp.q, 64, 0, 150), rows(inp.k, 32, 0, 150), rows(inp.v, 24, 0, 150), rows(inp.gates, 12, 0, 150), ownRows(0, 150));
    for (let p = 150; p < 155; p++) {
      const r = await s.decodeStep(rows(inp.q, 64, p, p + 1), rows(inp.k, 32, p, p + 1), rows(inp.v, 24, p, p + 1), rows(inp.gates, 12, p, p + 1), ownRows(p, p + 1));
      for (let i = 0; i < 48; i++) ownWorst = Math.max(ownWorst, Math.abs(r.out[i] - bg.out[p * 48 + i]));
    }
    s.resetCache();
    await s.decodeStep(rows(inp.q, 64, 0, 10), rows(inp.k, 32, 0, 10), rows(inp.v, 24, 0, 10), rows(inp.gates, 12, 0, 10));
    let ownLate = "";
    try { await s.decodeStep(rows(inp.q, 64, 10, 11), rows(inp.k, 32, 10, 11), rows(inp.v, 24, 10, 11), rows(inp.gates, 12, 10, 11), ownRows(10, 11)); } catch (e) { ownLate = String(e.message || e); }
    s.resetCache();
    const branches = { worst: ownWorst, mismatches: ownMismatches, differs: ownDiffers, bad: ownBad, short: ownShort, late: ownLate };
    const linear = { layout: lin.layout().compression, noWeights, badWeights, meanWeights, worst: linWorst, mismatches: linMismatches, differs: linDiffers };
    // Packed sequences: runPacked against referencePacked; the first sequence is the input's
    // first 120 tokens, so its rows are the full run's (causal prefix).
    const packedBatch = (cu) => ({ cuSeqlens: Int32Array.from(cu), q: inp.q, k: inp.k, v: inp.v, gates: inp.gates });
    const pg = await s.runPacked(packedBatch([0, 120, 121, 200]));
    const pr = s.referencePacked(packedBatch([0, 120, 121, 200]));
    let packedWorst = 0, packedMismatches = 0, prefixWorst = 0;
    for (let i = 0; i < pr.out.length; i++) packedWorst = Math.max(packedWorst, Math.abs(pg.out[i] - pr.out[i]));
    for (let i = 0; i < pr.blockIndices.length; i++) if (pg.blockIndices[i] !== pr.blockIndices[i]) packedMismatches++;
    for (let i = 0; i < 120 * 48; i++) prefixWorst = Math.max(prefixWorst, Math.abs(pg.out[i] - gpu.out[i]));
    let badCu = "";
    try { await s.runPacked(packedBatch([0, 120, 100, 200])); } catch (e) { badCu = String(e.message || e); }
    // Packed chunks (cuSeqlensQ, cuSeqlensK): a decode step at position 119 of a sequence of
    // 120 keys and the last 30 queries of one of 80: the packed prefill's rows there, and
    // referencePacked's; one offset of the pair alone is refused.
    const cat = (a, b) => { const c = new Float32Array(a.length + b.length); c.set(a); c.set(b, a.length); return c; };
    const pp = await s.runPacked(packedBatch([0, 120, 200]));
    const chunkBatch = {
      cuSeqlensQ: Int32Array.from([0, 1, 31]), cuSeqlensK: Int32Array.from([0, 120, 200]),
      q: cat(rows(inp.q, 64, 119, 120), rows(inp.q, 64, 170, 200)), k: inp.k, v: inp.v,
      gates: cat(rows(inp.gates, 12, 119, 120), rows(inp.gates, 12, 170, 200)),
    };
    const cg = await s.runPacked(chunkBatch);
    const cr = s.referencePacked(chunkBatch);
    const cw = cat(pp.out.subarray(119 * 48, 120 * 48), pp.out.subarray(170 * 48, 200 * 48));
    let chunkWorst = 0, chunkRef = 0;
    for (let i = 0; i < cw.length; i++) {
      chunkWorst = Math.max(chunkWorst, Math.abs(cg.out[i] - cw[i]));
      chunkRef = Math.max(chunkRef, Math.abs(cg.out[i] - cr.out[i]));
    }
    let badPair = "";
    try { await s.runPacked({ ...chunkBatch, cuSeqlensK: undefined }); } catch (e) { badPair = String(e.message || e); }
    const packed = { n: pr.out.length, worst: packedWorst, mismatches: packedMismatches, prefixWorst, badCu, chunkN: cg.out.length, chunkWorst, chunkRef, badPair };
    // Split targets: the plans take them (layout), decode steps give the same rows; a name
    // that is not a target, a value that is not an object, or a target that is not a
    // number, is refused.
    const sp = await window.nsaWgpu.createSession({ ...opts, splitTargets: { cmpAttn: 0, slcAttn: 3, winAttn: 0 } });
    await sp.decodeStep(rows(inp.q, 64, 0, 150), rows(inp.k, 32, 0, 150), rows(inp.v, 24, 0, 150), rows(inp.gates, 12, 0, 150));
    let splitWorst = 0;
    for (let p = 150; p < 155; p++) {
      const r = await sp.decodeStep(rows(inp.q, 64, p, p + 1), rows(inp.k, 32, p, p + 1), rows(inp.v, 24, p, p + 1), rows(inp.gates, 12, p, p + 1));
      for (let i = 0; i < 48; i++) splitWorst = Math.max(splitWorst, Math.abs(r.out[i] - gpu.out[p * 48 + i]));
    }
    let splitName = "", splitType = "", splitValue = "";
    try { await window.nsaWgpu.createSession({ ...opts, splitTargets: { cmp_attn: 4 } }); } catch (e) { splitName = String(e.message || e); }
    try { await window.nsaWgpu.createSession({ ...opts, splitTargets: 4 }); } catch (e) { splitType = String(e.message || e); }
    try { await window.nsaWgpu.createSession({ ...opts, splitTargets: { winAttn: "64" } }); } catch (e) { splitValue = String(e.message || e); }
    try { await window.nsaWgpu.createSession({ ...opts, splitTargets: { slcAttn: -1 } }); } catch (e) { splitValue += ` | ${String(e.message || e)}`; }
    const split = { set: sp.layout().splitTargets, defaults: s.layout().splitTargets, worst: splitWorst, name: splitName, type: splitType, value: splitValue };
    return { adapter: s.adapterInfo(), n: ref.out.length, worst, nan, mismatches, idx: ref.blockIndices.length, decodeWorst, rejected, workerWorst, workerMismatches, auto, f16, bogus, huge, linear, packed, branches, split };
  });
  console.log(`adapter: ${api.adapter}`);
  console.log(`API: ${api.n} outputs, max abs error ${api.worst.toExponential(2)} vs the CPU reference, ` +
    `${api.mismatches}/${api.idx} block indices differ, decode max abs ${api.decodeWorst.toExponential(2)}`);
  if (api.nan > 0) fail(`${api.nan} NaN outputs`);
  if (!(api.worst <= 1e-4)) fail(`out differs from the reference by ${api.worst}`);
  if (api.mismatches !== 0) fail(`${api.mismatches} block indices differ from the reference`);
  if (!(api.decodeWorst <= 1e-4)) fail(`decode rows differ from prefill by ${api.decodeWorst}`);
  if (!api.rejected.includes("shape mismatch for `q`")) fail(`a wrong shape was not rejected clearly: "${api.rejected}"`);
  console.log(`precision: "auto" -> ${api.auto}; "f16" ${api.f16}`);
  if (api.auto === "f16" ? !api.f16.startsWith("ran:") : !(api.auto === "f32" && api.f16.includes("shader-f16"))) {
    fail(`precision: "auto" gave ${api.auto}, "f16" ${api.f16}`);
  }
  if (!api.bogus.includes("option `precision`")) fail(`a bad precision was not rejected clearly: "${api.bogus}"`);
  if (!api.huge.includes("option `cmpBlock` must be an integer from 0 to 4294967295")) fail(`a block length past usize was not rejected clearly: "${api.huge}"`);
  const lin = api.linear;
  console.log(`linear: max abs error ${lin.worst.toExponential(2)} vs the CPU reference (decode steps included), ` +
    `${lin.mismatches} block indices differ, ${lin.differs} outputs differ from Mean's`);
  if (lin.layout !== "linear" || !(lin.worst <= 1e-4) || lin.mismatches !== 0 || lin.differs === 0) fail(`linear compression: ${JSON.stringify(lin)}`);
  if (!lin.noWeights.includes("w_k")) fail(`a linear run without weights was not refused clearly: "${lin.noWeights}"`);
  if (!lin.badWeights.includes("w_k")) fail(`weights of the wrong shape were not refused clearly: "${lin.badWeights}"`);
  if (!lin.meanWeights.includes("compresses by the mean")) fail(`a Mean session took weights: "${lin.meanWeights}"`);
  const br = api.branches;
  console.log(`branch keys/values: max abs error ${br.worst.toExponential(2)} vs the CPU reference (decode steps included), ` +
    `${br.mismatches} block indices differ, ${br.differs} outputs differ from the shared run's`);
  if (!(br.worst <= 1e-4 && br.mismatches === 0 && br.differs > 0)) fail(`branch keys/values: ${JSON.stringify(br)}`);
  if (!br.bad.includes("branches.kWin must be a Float32Array") || !br.short.includes("k_win") || !br.late.includes("resetCache")) fail(`bad branch tensors were not refused clearly: ${JSON.stringify(br)}`);
  const pk = api.packed;
  console.log(`packed: ${pk.n} outputs, max abs error ${pk.worst.toExponential(2)} vs referencePacked, ` +
    `${pk.mismatches} block indices differ, first sequence vs the full run ${pk.prefixWorst.toExponential(2)}`);
  if (!(pk.n === 9600 && pk.worst <= 1e-4 && pk.mismatches === 0 && pk.prefixWorst <= 1e-4)) fail(`packed sequences: ${JSON.stringify(pk)}`);
  if (!pk.badCu.includes("cu_seqlens")) fail(`bad offsets were not refused clearly: "${pk.badCu}"`);
  console.log(`packed chunks: ${pk.chunkN} outputs, max abs error ${pk.chunkWorst.toExponential(2)} vs the packed prefill's rows, ` +
    `${pk.chunkRef.toExponential(2)} vs referencePacked`);
  if (!(pk.chunkN === 31 * 48 && pk.chunkWorst <= 1e-4 && pk.chunkRef <= 1e-4)) fail(`packed chunks: ${JSON.stringify(pk)}`);
  if (!pk.badPair.includes("both `cuSeqlensQ` and `cuSeqlensK`")) fail(`half a pair of offsets was not refused clearly: "${pk.badPair}"`);
  const sp = api.split;
  console.log(`split targets: ${JSON.stringify(sp.set)} (defaults ${JSON.stringify(sp.defaults)}), decode max abs ${sp.worst.toExponential(2)} vs the default run`);
  const want = { cmpAttn: 0, cmpAttnMma: sp.defaults.cmpAttnMma, slcAttn: 3, winAttn: 0 };
  if (JSON.stringify(sp.set) !== JSON.stringify(want) || sp.defaults.cmpAttn !== 512 || !(sp.worst <= 1e-4)) fail(`split targets: ${JSON.stringify(sp)}`);
  if (!sp.name.includes("no target `cmp_attn`") || !sp.type.includes("must be an object") || !sp.value.includes("splitTargets.winAttn` must be a non-negative integer") || !sp.value.includes("splitTargets.slcAttn` must be a non-negative integer")) fail(`bad split targets were not refused clearly: ${JSON.stringify(sp)}`);
  console.log(`worker: max abs error ${api.workerWorst.toExponential(2)}, ${api.workerMismatches} block indices differ`);
  if (!(api.workerWorst <= 1e-4) || api.workerMismatches !== 0) fail("the Web Worker's result differs from the reference");

  // The demo itself, at 2048 tokens (32 blocks, 16 selected per query).
  await page.selectOption("#length", "2048");
  await page.click("#run");
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null, { timeout: 600000 });
  const status = await page.evaluate(() => document.getElementById("status").textContent);
  console.log(`demo: ${status}`);
  if (!status.startsWith("done")) fail(`demo did not finish: ${status}`);
  const box = await page.locator("#overview").boundingBox();
  await page.mouse.click(box.x + box.width / 2, box.y + box.height * 0.8);
  const info = await page.evaluate(() => document.getElementById("qinfo").textContent);
  if (!info.startsWith("query ")) fail(`inspecting a query failed: ${info}`);
  await page.screenshot({ path: join(here, "screenshot.png"), fullPage: true });
  console.log(`screenshot: ${join(here, "screenshot.png")}`);
  if (errors.length) fail(`the page logged errors:\n${errors.join("\n")}`);
} catch (e) {
  fail(e.stack || String(e));
} finally {
  if (browser) await browser.close();
  server.kill();
}
if (!process.exitCode) console.log("browser test passed");
