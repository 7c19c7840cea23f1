//! nsa-wgpu for JavaScript: `wasm-bindgen` glue over the library (which itself stays free of
//! `#[wasm_bindgen]`). Built for `wasm32-unknown-unknown`; on other targets this crate is empty.
//! The calls are documented in `web-demo/README.md`.

#[cfg(target_arch = "wasm32")]
mod api;
