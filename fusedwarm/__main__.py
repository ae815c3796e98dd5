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


def _info() -> int:
    rows = [
        ("fusedwarm", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("GPU", torch.cuda.get_device_name(0) if _build.cuda_wanted() else "none visible"),
    ]
    aot = _build.aot_library()
    if aot is not None:
        rows += [("backend", "ahead-of-time build"), ("library", str(aot)), ("ready", "yes")]
    else:
        try:
            cfg = _build.config()
        except _build.BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        rows += [
            ("backend", cfg.backend),
            ("CUDA arch", cfg.arch_list or "-"),
            ("cache", str(cfg.directory)),
            ("ready", "yes" if cfg.ready else "no (run: python -m fusedwarm build)"),
        ]
    emu = _build.config("emu")
    emu_state = "built" if emu.ready else "built on first use: fusedwarm.emulator"
    rows.append(("emulated CUDA", f"{emu.directory} ({emu_state})"))
    rows += [
        ("C++ compiler", shutil.which(os.environ.get("CXX", "c++")) or "not found"),
        ("ninja", shutil.which("ninja") or "not found"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _build_cmd(verbose: bool) -> int:
    start = time.perf_counter()
    try:
        cfg = _build.build(verbose=verbose)
    except _build.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = cfg.library if cfg is not None else _build.aot_library()
    print(f"fusedwarm extension ready ({time.perf_counter() - start:.1f} s): {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedwarm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, backend, CUDA arch, cache path and whether the build is ready")
    build = sub.add_parser("build", help="build the extension now (it is otherwise built on first use)")
    build.add_argument("--verbose", action="store_true", help="show the compiler output")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return _build_cmd(args.verbose)


if __name__ == "__main__":
    sys.exit(main())
