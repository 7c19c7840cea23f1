#!/usr/bin/env bash
# Packs what a run on the project's GPU machine needs into .gpu/ (git-ignored, made by
# ../shared/gpu/prepare.sh, which also fetches the Vulkan loader into .gl/): the release
# `nsa` binary and the `gpu` and `decode` test binaries, stripped and zstd-compressed into
# .gpu/z/ (the tree that travels is capped at 64 MiB: about 2.3 MB each so), and this
# machine's zstd with the libraries it links, which the GPU machine lacks. On the GPU
# machine, tools/gpu-unpack.sh puts the binaries in /tmp/b. Run from anywhere in the
# checkout; `--no-tests` packs `nsa` alone.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tests=1
[ "${1:-}" = "--no-tests" ] && tests=0
mkdir -p .gpu/z .gpu/bin .gpu/lib
rm -f .gpu/z/*.zst
zstd_bin=$(command -v zstd)
cp "$zstd_bin" .gpu/bin/zstd
# The libraries zstd links besides the C library's own.
# (`|| true`: a zstd linking nothing else would end grep, and with pipefail the script.)
ldd "$zstd_bin" | awk '/=> \// {print $3}' | { grep -Ev '/lib(c|m|pthread|dl|rt)\.so' || true; } |
  while read -r lib; do cp -L "$lib" .gpu/lib/; done
pack() { # pack NAME PATH
  local tmp
  tmp=$(mktemp)
  cp "$2" "$tmp"
  strip "$tmp"
  LD_LIBRARY_PATH=.gpu/lib .gpu/bin/zstd -q -19 -T0 -f "$tmp" -o ".gpu/z/$1.zst"
  rm -f "$tmp"
  echo "packed $1 ($(du -h ".gpu/z/$1.zst" | cut -f1))"
}
cargo build --release -p nsa-cli
pack nsa target/release/nsa
if [ "$tests" = 1 ]; then
  # The test executables' paths, from cargo's JSON messages.
  cargo test --release --test gpu --test decode --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu", "decode"):
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do pack "$name" "$exe"; done
fi
du -sh .gpu .gl 2>/dev/null || true
