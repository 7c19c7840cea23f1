#!/usr/bin/env bash
# Builds the demo (wasm + JS bindings into www/pkg) and, with `serve`, serves it on
# http://127.0.0.1:${PORT:-8000}/. Installs the exact wasm-bindgen CLI that Cargo.lock pins.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ver=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if ! wasm-bindgen --version 2>/dev/null | grep -qF "$ver"; then
  # Not --locked: the CLI's own lock file wants a crate version this registry may lack.
  cargo install wasm-bindgen-cli --version "$ver"
fi
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
cargo build --release -p nsa-web --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir web-demo/www/pkg \
  target/wasm32-unknown-unknown/release/nsa_web.wasm
if [ "${1:-}" = serve ]; then
  port=${PORT:-8000}
  echo "serving http://127.0.0.1:$port/ (Ctrl-C stops)"
  cd web-demo/www && exec python3 -m http.server --bind 127.0.0.1 "$port"
fi
