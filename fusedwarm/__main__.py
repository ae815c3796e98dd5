"""Command line: ``python -m fusedwarm info`` and ``python -m fusedwarm build``.

It only parses arguments and prints; building is :mod:`fusedwarm._build`'s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import torch

from . import __version__, _build


def _gpu_backends() -> list[str]:
    """The CUDA backends of the visible GPUs ("cuda-sm_90", ...), none without a GPU."""
    if not _build.cuda_wanted():
        return []
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"cuda-sm_{major}{minor}" for major, minor in sorted(caps)]


def _nvrtc_row() -> str:
    try:
        info = _build._nvrtc()
    except _build.BuildError as exc:
        return f"not available ({str(exc).split('. ')[0]})"
    return f"NVRTC {info.version} through CuPy (sm_{min(info.archs)}..sm_{max(info.archs)})"


def _info() -> int:
    rows = [
        ("fusedwarm", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("GPU", torch.cuda.get_device_name(0) if _build.cuda_wanted() else "none visible"),
        ("cache", str(_build.cache_root())),
    ]
    aot = _build.aot_library()
    try:
        if aot is not None:
            rows.append(("torch-facing library", f"{aot} (ahead-of-time build)"))
        else:
            lib = _build.library("core")
            rows.append(("torch-facing library",
                         f"{lib.path} ({'yes, built' if lib.ready else 'built on first use'})"))
        emu = _build.library("emu")
    except _build.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows.append(("emulated CUDA", f"{emu.path} ({'built' if emu.ready else 'built on first use: fusedwarm.emulator'})"))
    cached = _build.cached_variants()
    total = len(_build.step_variants())
    for backend, files in cached.items():
        names = sorted({f.name.split("-")[0] for f in files})
        steps = [n for n in names if n != "misc"]
        rows.append((f"{backend} kernels", f"{len(steps)} of {total} step variants" + (" + misc" if "misc" in names else "")
                     + f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"))
    if not cached:
        rows.append(("kernel variants", "none cached yet (each is compiled on first use)"))
    rows += [
        ("C++ compiler", shutil.which(os.environ.get("CXX", "c++")) or "not found"),
        ("CUDA compiler", _nvrtc_row()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _build_cmd(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    backends = [b for b in args.backend.split(",") if b] if args.backend else None
    if args.arch:
        backends = (backends or []) + [f"cuda-{a}" for a in args.arch.split(",") if a]
    if backends is None:
        backends = _gpu_backends() or ["cpu"]
    if args.all:
        names = [*_build.step_variants(), "misc"]
    else:
        names = [n for n in (args.variants or "").split(",") if n]
    try:
        for name in names:  # a misspelt variant is an error before anything is compiled
            if name != "misc":
                _build._variant_defines(name)
        lib = _build.build(verbose=args.verbose)
        where = lib.path if lib is not None else _build.aot_library()
        print(f"torch-facing library ready ({time.perf_counter() - start:.1f} s): {where}")

        def progress(backend: str, name: str, path) -> None:
            print(f"{backend} {name}: {path} ({time.perf_counter() - start:.1f} s)")

        files = _build.prebuild(backends, names, verbose=args.verbose, progress=progress)
    except _build.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if names:
        print(f"{len(files)} kernel modules ready for {', '.join(backends)} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedwarm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, the cache, what is built and which compilers are available")
    build = sub.add_parser(
        "build", help="build now what is otherwise built on first use: the torch-facing library and kernel variants",
        description="Kernel variants are named <rule>.<weights>.<states>.<arithmetic>: rule adamw, sgd (no "
                    "momentum), sgdm or lion; weights f32, bf16x0, bf16x8, bf16x16, f16x0, f16x8 or f16x16 (dtype "
                    "and extra bits); states f32 or bf16 (f32 for sgd); arithmetic ieee or pam. Example: "
                    "adamw.bf16x16.bf16.ieee is AdamW on bfloat16 weights with 16 extra bits and bfloat16 states.")
    build.add_argument("--all", action="store_true", help="every kernel variant (for shared caches and images)")
    build.add_argument("--variants", help="comma-separated variant names, e.g. adamw.bf16x16.bf16.ieee")
    build.add_argument("--backend", help="cpu, emu or cuda-sm_<NN>, comma-separated (default: the visible GPUs' "
                                         "architectures, else cpu)")
    build.add_argument("--arch", help="CUDA architectures to compile for without a GPU, e.g. sm_80,sm_90")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return _build_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
