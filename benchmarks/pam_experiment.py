"""Training with piecewise-affine arithmetic (Kosson & Jaggi 2023): a small byte-level GPT.

Three runs of the byte-level GPT of ``benchmarks/models.py`` (``ByteGPT``, GPT-2's initialization)
from the same initial weights on the same batches, on the CPU:

1. ``fusedwarm.AdamW`` with IEEE float32 arithmetic;
2. ``fusedwarm.AdamW(arithmetic="pam")``: every per-element multiply, divide and sqrt of the
   update is a piecewise-affine operation;
3. the PAM optimizer and :class:`fusedwarm.pam.Linear` in every linear layer (attention's two
   batched products, softmax, layernorm and the loss stay IEEE float32).

Weights and optimizer states are float32, so the runs differ only in arithmetic. The text is the
source code of a few Python standard-library modules (as in ``fusedwarm.demo``), nothing is
downloaded. The target is that run 2's final held-out loss is within 2% of run 1's.

Run from the repository root::

    PYTHONPATH=. python benchmarks/pam_experiment.py

Results go to ``benchmarks/results/pam_experiment.{json,md}`` and, when matplotlib is installed,
``pam_experiment.png`` (training loss curves).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fusedwarm
from fusedwarm import pam
from fusedwarm.demo import TEXT_MODULES, batches, load_text
from models import ByteGPT, loss_of
from step import git

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_REL = 0.02  # run 2's final eval loss within 2% of run 1's

RUNS = {
    "ieee": "1) AdamW, IEEE arithmetic",
    "pam-optimizer": "2) AdamW, arithmetic='pam'",
    "pam-optimizer+linear": "3) arithmetic='pam' + pam.Linear everywhere",
}


def run(label: str, model: nn.Module, opt: torch.optim.Optimizer, train: list[torch.Tensor],
        held_out: list[torch.Tensor], log_every: int) -> dict:
    """Trains one batch per step; returns the training losses, the final held-out loss and timings."""
    losses, times = [], []
    start = time.perf_counter()
    for i, xy in enumerate(train):
        t0 = time.perf_counter()
        loss = loss_of(model, xy)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if (i + 1) % log_every == 0:
            print(f"  [{label}] step {i + 1:4d}/{len(train)}  loss {statistics.fmean(losses[-log_every:]):.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    with torch.no_grad():
        eval_loss = statistics.fmean(loss_of(model, xy).item() for xy in held_out)
    print(f"  [{label}] held-out loss {eval_loss:.4f}", flush=True)
    return {"train_losses": losses, "eval_loss": eval_loss, "step_ms": 1e3 * statistics.median(times),
            "seconds": time.perf_counter() - start}


def _plot(results: dict, path: Path, smooth: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, r in results.items():
        losses = r["train_losses"]
        avg = [statistics.fmean(losses[max(0, i - smooth + 1): i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(avg) + 1), avg, label=f"{RUNS[key]} (held-out {r['eval_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss, nats/byte ({smooth}-step mean)")
    ax.set_title("Byte-level transformer on stdlib source: IEEE vs piecewise-affine")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_metadata(experiment: str, argv: list[str] | None, text: bytes) -> dict:
    """The result file's header shared by the CPU experiments: what ran, where, and on which text."""
    return {
        "experiment": experiment,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD") or "unknown",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "fusedwarm": fusedwarm.__version__},
        "data": {"modules": list(TEXT_MODULES), "bytes": len(text), "train_fraction": 0.9},
    }


def add_run_arguments(parser: argparse.ArgumentParser, steps: int, width: int, layers: int, lr: float) -> None:
    """The flags the CPU experiments share (training length, batch and model shape, learning rate),
    with each experiment's defaults."""
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps})")
    parser.add_argument("--batch", type=int, default=16, help="windows per step (default: 16)")
    parser.add_argument("--length", type=int, default=64, help="bytes per window, the model's context (default: 64)")
    parser.add_argument("--width", type=int, default=width, help=f"model width (default: {width})")
    parser.add_argument("--layers", type=int, default=layers, help=f"transformer blocks (default: {layers})")
    parser.add_argument("--heads", type=int, default=4, help="attention heads; must divide --width (default: 4)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, steps=400, width=64, layers=2, lr=3e-3)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    text = load_text()
    split = int(0.9 * len(text))
    train = batches(text[:split], args.steps, args.batch, args.length, args.seed)
    held_out = batches(text[split:], args.eval_batches, args.batch, args.length, args.seed + 1)
    init = ByteGPT(args.layers, args.width, args.heads, args.length).state_dict()
    n_params = sum(t.numel() for t in init.values())
    hyper = dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, state_dtype=torch.float32, seed=args.seed,
                 warmup="none")
    print(f"data: {len(text):,} bytes of stdlib source; model: {n_params:,} parameters; {args.steps} steps of "
          f"{args.batch} x {args.length} bytes; torch {torch.__version__}, {torch.get_num_threads()} threads")

    results = {}
    for key in RUNS:
        print(RUNS[key], flush=True)
        linear = pam.Linear if key == "pam-optimizer+linear" else nn.Linear
        model = ByteGPT(args.layers, args.width, args.heads, args.length, linear=linear)
        model.load_state_dict(init)
        opt = fusedwarm.AdamW(model.parameters(), **hyper, arithmetic="ieee" if key == "ieee" else "pam")
        results[key] = run(key, model, opt, train, held_out, log_every=max(1, args.steps // 10))

    base = results["ieee"]["eval_loss"]
    for r in results.values():
        r["rel_to_ieee"] = r["eval_loss"] / base - 1
    target_met = abs(results["pam-optimizer"]["rel_to_ieee"]) <= TARGET_REL
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        **run_metadata("pam_experiment", argv, text),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "target": f"run 2 final held-out loss within {TARGET_REL:.0%} of run 1",
        "target_met": target_met,
        "runs": {key: {"label": RUNS[key], **r} for key, r in results.items()},
    }
    (args.out / "pam_experiment.json").write_text(json.dumps(record, indent=1) + "\n")

    tail = min(20, args.steps)
    lines = [
        "| run | held-out loss | vs IEEE | train loss (last %d) | ms/step |" % tail,
        "|---|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        lines.append(f"| {RUNS[key]} | {r['eval_loss']:.4f} | {100 * r['rel_to_ieee']:+.2f}% | "
                     f"{statistics.fmean(r['train_losses'][-tail:]):.4f} | {r['step_ms']:.1f} |")
    lines += ["", f"{n_params:,} parameters, {args.steps} steps of {args.batch} x {args.length} bytes, AdamW "
              f"lr {args.lr}, float32 weights and states, CPU ({torch.get_num_threads()} threads). Held-out loss: "
              f"mean cross-entropy (nats/byte) over {args.eval_batches} batches of the last 10% of the text. "
              f"Target (run 2 within {TARGET_REL:.0%} of run 1): {'met' if target_met else 'NOT met'}."]
    table = "\n".join(lines) + "\n"
    (args.out / "pam_experiment.md").write_text(table)
    plotted = _plot(results, args.out / "pam_experiment.png", smooth=max(1, args.steps // 40))
    print("\n" + table)
    print(f"results: {args.out / 'pam_experiment.json'}, .md" + (", .png" if plotted else " (no matplotlib: no plot)"))
    if not math.isfinite(results["pam-optimizer"]["eval_loss"]):
        sys.exit("run 2 diverged")


if __name__ == "__main__":
    main()
