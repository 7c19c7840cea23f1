#!/usr/bin/env bash
# On the project's GPU machine, from the checkout's root (carried with `.gl` and `.gpu`):
# installs the Vulkan loader packages of .gl/ and decompresses what tools/gpu-pack.sh packed
# into /tmp/b (`/tmp/b/nsa`, `/tmp/b/gpu`, `/tmp/b/decode`), then lists them. A device
# command then reads `tools/gpu-unpack.sh && /tmp/b/nsa bench ...`.
set -euo pipefail
for f in .gl/*.deb; do dpkg -x "$f" / >/dev/null; done
ldconfig
mkdir -p /tmp/b
for f in .gpu/z/*.zst; do
  LD_LIBRARY_PATH=$PWD/.gpu/lib .gpu/bin/zstd -q -d -f "$f" -o "/tmp/b/$(basename "$f" .zst)"
done
chmod +x /tmp/b/*
ls /tmp/b
