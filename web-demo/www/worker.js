// NSA in a Web Worker: the same wasm API off the main thread. Post {opts, q, k, v, gates};
// the reply is {ok, out, blockIndices, adapter} or {ok: false, error}.
import init, { NsaSession } from "./pkg/nsa_web.js";

const ready = init();

self.onmessage = async (ev) => {
  try {
    await ready;
    const { opts, q, k, v, gates } = ev.data;
    const session = await NsaSession.create(opts);
    const r = await session.run(q, k, v, gates);
    self.postMessage({ ok: true, out: r.out, blockIndices: r.blockIndices, adapter: session.adapterInfo() });
  } catch (e) {
    self.postMessage({ ok: false, error: String((e && e.message) || e) });
  }
};
