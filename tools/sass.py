#!/usr/bin/env python3
"""The machine code (SASS) of the kernels an NVIDIA Vulkan driver compiled, with a summary.

NVIDIA's driver caches every compiled pipeline on disk. Run the program with the cache
pointed at an empty folder, then give that folder to this script:

    mkdir -p /tmp/nvc   # the driver does not create it
    export __GL_SHADER_DISK_CACHE_PATH=/tmp/nvc __GL_SHADER_DISK_CACHE_SKIP_CLEANUP=1
    nsa bench --lengths 1024 --dense-max 1024 --iters 1 --warmup 0
    python3 tools/sass.py /tmp/nvc --nvdisasm /usr/local/cuda/bin/nvdisasm --out sass/

Each cache file holds one zstd frame per pipeline; a frame, past its first 8 bytes, is a
container that `nvdisasm -b SM90` reads whole (sections, register count, code). For every
pipeline the script writes `NNN.txt` (the disassembly) and prints its registers, its
instruction count by kind, and each loop (a backward branch) with the kinds of its
instructions. Needs `zstd` and `nvdisasm` (CUDA's, or the one Triton ships), not a GPU.
"""

import argparse
import collections
import pathlib
import re
import subprocess
import sys

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
KINDS = ("FFMA", "HMMA", "LDSM", "LDS", "STS", "LDG", "STG", "LDL", "STL", "BAR", "SHFL", "MUFU")


def frames(blob):
    """The zstd frames of one cache file, each up to the next frame's start."""
    starts = []
    at = blob.find(ZSTD_MAGIC)
    while at >= 0:
        starts.append(at)
        at = blob.find(ZSTD_MAGIC, at + 1)
    return [blob[s:e] for s, e in zip(starts, starts[1:] + [len(blob)])]


def decompress(frame):
    # The bytes after the frame (the next entry's header) make zstd fail after it has
    # written the frame, so its output is taken whatever it returns.
    return subprocess.run(
        ["zstd", "-d", "-c"], input=frame, capture_output=True, check=False
    ).stdout


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def summary(listing):
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(INSTR.match, listing) if m]
    regs = next((l.split("=")[1] for l in listing if "Register count" in l), None)
    if regs is None:
        # Code sections alone (disassemble) carry no count: the highest register the code
        # names bounds it from below (the driver rounds up and reserves a few more).
        named = [int(r) for _, t in instrs for r in re.findall(r"\bR(\d+)\b", t)]
        regs = f">= {max(named) + 1} (R{max(named)} named)" if named else "?"
    kinds = collections.Counter(opcode(t) for _, t in instrs)
    head = f"registers {regs}, {len(instrs)} instructions: " + ", ".join(
        f"{k} {kinds[k]}" for k in KINDS if kinds[k]
    )
    index = {a: i for i, (a, _) in enumerate(instrs)}
    loops = []
    for i, (a, t) in enumerate(instrs):
        m = re.search(r"BRA\s+(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in index:
            body = instrs[index[int(m.group(1), 16)] : i + 1]
            c = collections.Counter(opcode(x) for _, x in body)
            top = ", ".join(f"{k} {n}" for k, n in c.most_common(6))
            loops.append(f"  loop {body[0][0]:#06x}-{a:#06x}: {len(body)} instructions ({top})")
    return len(instrs), head, loops


def disassemble(nvdisasm, arch, binary):
    """The listing of one pipeline. nvdisasm 13.0 crashes on the whole container of the
    tensor-core kernels (cooperative matrices); for those it disassembles the code
    sections alone (`-c`), without the register count (tools/pipeline-stats has it; the
    summary then gives the highest register the code names)."""
    run = subprocess.run([nvdisasm, "-b", arch, str(binary)], capture_output=True, text=True)
    if run.returncode != 0:
        run = subprocess.run(
            [nvdisasm, "-b", arch, "-c", str(binary)], capture_output=True, text=True
        )
    return (run.stdout + run.stderr).splitlines()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=pathlib.Path, help="the driver's shader cache folder")
    ap.add_argument("--nvdisasm", default="nvdisasm")
    ap.add_argument("--arch", default="SM90", help="nvdisasm -b: SM90 for Hopper")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("sass"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in a.cache.rglob("*.bin") if p.is_file())
    if not files:
        sys.exit(f"no *.bin under {a.cache}: was __GL_SHADER_DISK_CACHE_PATH set?")
    n = 0
    for path in files:
        for frame in frames(path.read_bytes()):
            raw = decompress(frame)
            if len(raw) <= 8:
                continue
            binary = a.out / f"{n:03d}.bin"
            binary.write_bytes(raw[8:])
            listing = disassemble(a.nvdisasm, a.arch, binary)
            (a.out / f"{n:03d}.txt").write_text("\n".join(listing) + "\n")
            binary.unlink()
            count, head, loops = summary(listing)
            if count:
                print(f"{n:03d}: {head}")
                print("\n".join(loops))
            n += 1


if __name__ == "__main__":
    main()
