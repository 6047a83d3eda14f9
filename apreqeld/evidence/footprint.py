"""Runtime footprint: the resident memory of a separate process holding a model loaded for
serving, measured in a child process so that nothing else this process holds is counted.

`python -m apreqeld.evidence.footprint GGUF --ctx N --threads T` imports llama.cpp and records
the process's resident set (the *baseline*: interpreter, numpy, llama.cpp, no model), loads the
model as llama.cpp serves it (mmap), creates a context of N tokens with a batch of
min(N, 512) tokens (llama.cpp's default micro-batch), decodes one full batch as a prompt and one
generated token (the warm-up), and records the resident set again. It prints one JSON line.

footprint = rss_loaded - rss_baseline: anonymous memory (KV cache, which llama.cpp zeroes at
creation, compute buffers as far as a full batch touches them, weights repacked for the CPU)
plus the model file's pages that a decode maps in (every weight a decode reads; of the token
embedding only the rows read, unless the output layer shares it). The load also reads the file
pages of weights it repacks; they are dropped from the page tables (madvise) before the second
warm-up, so they are not counted: they are clean page cache the kernel reclaims first. The
file's page cache is evicted too and readahead turned off for the mapping, because the kernel
maps cached neighbours of a faulting page with it (fault-around, 64 KiB): without this, the same
tensors in two files with different metadata measured 17 MiB apart.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

from apreqeld import engine
from apreqeld.errors import EngineError
from apreqeld.evidence.workspace import Workspace, cached_measurement
from apreqeld.gguf.split import split_files

SERVING_BATCH = 512
MADV_RANDOM, MADV_DONTNEED = 1, 4  # linux/mman.h
DEFINITION = (
    "footprint = resident set (RSS) of a child process after loading the GGUF (mmap), creating "
    "a context of the serving length with a batch of min(ctx, 512), decoding one full batch "
    "plus one token, dropping the file's pages from its page tables (madvise DONTNEED) and "
    "decoding the same again, minus the same process's RSS before loading (interpreter and "
    "llama.cpp only; recorded as baseline_rss_bytes). It counts the KV cache, the compute "
    "buffers as touched, weights llama.cpp repacked for the CPU, and the file pages a decode "
    "reads; not the file pages only the load read (those of repacked weights). Before the second "
    "decode the file's page cache is evicted and readahead is off (MADV_RANDOM), so that the "
    "kernel maps only the pages a decode reads, not cached neighbours (fault-around).")


def _memory() -> dict[str, int]:
    """Resident set now (psutil) and, on Linux, its anonymous/file split and peak."""
    found = {"rss": psutil.Process().memory_info().rss}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM") and value.strip().endswith("kB"):
                found[key.lower()] = int(value.split()[0]) * 1024
    return found


def measure_here(path: Path, /, *, n_ctx: int, threads: int, gpu_layers: int = 0) -> dict:
    """Load `path` for serving in *this* process and report its resident memory (child side)."""
    engine.engine_version()  # import and initialise llama.cpp before the baseline
    baseline = _memory()
    n_batch = min(n_ctx, SERVING_BATCH)
    with engine.open_session(path, n_ctx=n_ctx, n_batch=n_batch, threads=threads,
                             gpu_layers=gpu_layers) as s:
        rng = np.random.default_rng(0)
        n_prompt = min(n_batch, n_ctx - 1)
        prompt = rng.integers(0, s.n_vocab, size=n_prompt, dtype=np.int32)
        outputs = np.zeros(n_prompt, dtype=np.int8)
        outputs[-1] = 1

        def warm_up() -> None:
            s.clear()
            s.decode(prompt, outputs=outputs)
            s.decode(prompt[:1], start_pos=n_prompt)
            s.synchronize()

        warm_up()
        after_load = _memory()
        dropped = _drop_mapped_pages(path)  # what loading read but decoding does not need
        warm_up()  # faults back in exactly the file pages a decode reads
        loaded = _memory()
        file_rss = _mapped_rss(path)
    return {"footprint_bytes": loaded["rss"] - baseline["rss"], "rss_loaded_bytes": loaded["rss"],
            "baseline_rss_bytes": baseline["rss"],
            "model_file_rss_bytes": file_rss,
            "rss_after_load_bytes": after_load["rss"], "mapped_bytes_dropped": dropped,
            "rss_anon_bytes": loaded.get("rssanon"), "rss_file_bytes": loaded.get("rssfile"),
            "peak_rss_bytes": loaded.get("vmhwm"), "n_ctx": n_ctx, "n_batch": n_batch,
            "threads": threads, "gpu_layers": gpu_layers}


def model_files(path: Path) -> list[str]:
    """The files a model's mappings name in /proc (every split, links resolved)."""
    return [str(Path(f).resolve()) for f in split_files(path)]


def mapped_rss(path: Path, *, pid: int | str = "self") -> dict[str, int] | None:
    """Resident bytes of a process's mappings of each of the model's files
    (/proc/PID/smaps), or None where /proc does not say."""
    smaps = Path(f"/proc/{pid}/smaps")
    try:
        text = smaps.read_text()
    except OSError:
        return None
    targets = set(model_files(path))
    found: dict[str, int] = {}
    current = None
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = head[5] if len(head) == 6 and head[5] in targets else None
        elif current is not None and head[:1] == ["Rss:"]:
            found[current] = found.get(current, 0) + int(head[1]) * 1024
    return found


def _mapped_rss(path: Path) -> int | None:
    """Resident bytes of this process's mappings of the model's files, or None."""
    found = mapped_rss(path)
    return None if found is None else sum(found.values())


def drop_mapped_pages(path: Path) -> int:
    """Unmap from this process's page tables every resident page of the model's mappings
    (they stay in the page cache), so that a following decode maps in only the pages it
    reads; returns the bytes of the mappings advised. Weights llama.cpp repacked into its own
    buffers at load are read once from the file and never again: their file pages are not
    part of the footprint."""
    targets = set(model_files(path))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in targets:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            libc.madvise(start, end - start, MADV_RANDOM)
            if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                dropped += end - start
    return dropped


def _drop_mapped_pages(path: Path) -> int:
    """`drop_mapped_pages`, then the files' (clean) page cache evicted too: the kernel maps
    cached neighbours of a faulting page along with it (fault-around), which would count
    pages no decode reads."""
    dropped = drop_mapped_pages(path)
    for target in model_files(path):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return dropped


def measure_footprint(path: Path, /, *, n_ctx: int, threads: int, gpu_layers: int = 0,
                      timeout_s: float = 600) -> dict:
    """Run `measure_here` in a fresh child process and return what it measured."""
    cmd = [sys.executable, "-m", "apreqeld.evidence.footprint", str(path), "--ctx", str(n_ctx),
           "--threads", str(threads), "--gpu-layers", str(gpu_layers)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or not lines:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(f"footprint of {Path(path).name} could not be measured: {detail}")
    return json.loads(lines[-1])


def cached_footprint(path: Path, /, *, workspace: Workspace, n_ctx: int, threads: int,
                     gpu_layers: int = 0) -> dict:
    """`measure_footprint`, cached in the work directory by the file's sha256 and the setup."""
    return cached_measurement(
        workspace, {"footprint": workspace.sha256(path), "n_ctx": n_ctx, "threads": threads,
                    "gpu_layers": gpu_layers, "engine": engine.engine_version(),
                    "apreqel_footprint": 4},
        lambda: measure_footprint(path, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers))


def main(argv: list[str] | None = None) -> int:
    """Child entry point: measure one GGUF, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m apreqeld.evidence.footprint",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = measure_here(args.gguf, n_ctx=args.ctx, threads=args.threads,
                              gpu_layers=args.gpu_layers)
    except Exception as exc:  # the parent turns this into one line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover - child process
    sys.exit(main())
