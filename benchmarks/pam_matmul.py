"""Throughput of ``fusedwarm.pam.matmul`` (PAM products, float32 sums) against ``torch.matmul``.

Square and transformer-shaped float32 products on fresh random inputs; each is timed as the
median of ``--repeats`` calls after a warm-up call, with torch's default thread count. Throughput
is 2 M K N / time (one multiply and one add per term, PAM or not). The CUDA kernel exists
(``csrc/cuda/misc_kernels.cu``) and is tested against the CPU when a GPU is present, but
``--device cuda`` has not been measured on the machine that produced the committed results.

Run from the repository root::

    PYTHONPATH=. python benchmarks/pam_matmul.py

Results go to ``benchmarks/results/pam_matmul_<device>.json`` (device, versions, commit, rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fusedwarm
from fusedwarm import pam
from step import git

RESULTS = Path(__file__).resolve().parent / "results"
# (M, K, N): squares, then the linear layers of a width-64 transformer on 1024 tokens.
SHAPES = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 64, 192), (1024, 256, 64), (1024, 64, 256)]


def _time(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{'M x K x N':>18}{'pam GFLOP/s':>14}{'torch GFLOP/s':>15}{'torch / pam':>13}")
    for m, k, n in SHAPES:
        a = torch.randn(m, k, device=args.device)
        b = torch.randn(k, n, device=args.device)
        t_pam = _time(lambda: pam.matmul(a, b), args.device, args.repeats)
        t_torch = _time(lambda: torch.matmul(a, b), args.device, args.repeats)
        flops = 2.0 * m * k * n
        row = {"m": m, "k": k, "n": n, "pam_ms": 1e3 * t_pam, "torch_ms": 1e3 * t_torch,
               "pam_gflops": flops / t_pam / 1e9, "torch_gflops": flops / t_torch / 1e9,
               "torch_speedup": t_pam / t_torch}
        rows.append(row)
        print(f"{f'{m} x {k} x {n}':>18}{row['pam_gflops']:>14.2f}{row['torch_gflops']:>15.2f}"
              f"{row['torch_speedup']:>12.1f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "pam_matmul",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD") or "unknown",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "fusedwarm": fusedwarm.__version__},
        "note": "GFLOP/s = 2 M K N / median time; pam.matmul sums strictly in order of k (bit-identical "
                "CPU/CUDA), torch.matmul uses BLAS",
        "rows": rows,
    }
    path = args.out / f"pam_matmul_{args.device}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
