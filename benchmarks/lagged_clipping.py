"""What ``clip="lagged"`` costs against exact global-norm clipping, and safer lagged rules.

With ``backward_step=True`` the global gradient norm is known only after every parameter has been
updated, so ``clip="lagged"`` scales iteration t's gradients by iteration t-1's coefficient
``min(1, L / n_{t-1})`` (1 at the first iteration). The clipped global norm is then
``n_t min(1, L / n_{t-1})``, which exceeds the limit L by ``n_t / max(n_{t-1}, L)`` whenever the norm
jumps. This script trains the byte-level GPT of ``benchmarks/models.py`` (bfloat16 weights,
``fusedwarm.AdamW``) at a small batch, where the norm is noisy, under several rules that all see
the same initial weights and batches, and reports per rule:

* ``over``: iterations whose clipped global norm exceeds 1.5 L, and the largest ratio to L;
* ``step``: the mean of (clipped norm) / min(n_t, L), i.e. the gradient size relative to what
  exact clipping would apply (1 = the same; below 1 = the rule clips more than needed);
* ``loss``: the mean training loss of the last 10 iterations.

Rules (each a per-tensor gradient multiplier from this iteration's per-tensor norms ``g_i`` and
the past; ``n`` is the global norm, ``c(x) = min(1, L / (x + 1e-6))``):

* ``exact``: ``c(n_t)``, as ``torch.nn.utils.clip_grad_norm_`` (``clip="global"``);
* ``tensor``: ``c(g_i)`` (``clip="tensor"``);
* ``lagged``: ``c(n_{t-1})``, 1 at t = 1 (``clip="lagged"``, fusedwarm's rule);
* ``lagged+tensor``: ``min(c(n_{t-1}), c(g_i))``; at t = 1 ``c(sqrt(T) g_i)`` with T tensors,
  which bounds the first global norm by L (the rule of ``clip="lagged-tensor"``);
* ``lagged-max``: ``c(M_{t-1})`` with the decaying maximum ``M_t = max(n_t, 0.9 M_{t-1})``;
* ``lagged-max+tensor``: both of the last two.

``fusedwarm-lagged`` runs the optimizer's own ``clip="lagged"`` with ``backward_step=True`` as a
check that the ``lagged`` simulation is the rule the library implements. The other rules scale the
bfloat16 gradients before a plain ``step()``.

Run from the repository root::

    PYTHONPATH=. python benchmarks/lagged_clipping.py

Results go to ``benchmarks/results/lagged_clipping.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import fusedwarm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ByteGPT, byte_loss, load_text, make_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DECAY = 0.9  # of the decaying maximum in the lagged-max rules


def coef(limit: float, norm: torch.Tensor) -> torch.Tensor:
    """min(1, limit / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    return (limit / (norm + 1e-6)).clamp(max=1.0)


class Rule:
    """A clipping rule: per-tensor multipliers for iteration t from the per-tensor norms and the past.

    Args:
        name: one of the rules of the module docstring.
        limit: the clipping threshold L.
    """

    def __init__(self, name: str, limit: float) -> None:
        self.name, self.limit = name, limit
        self.prev: torch.Tensor | None = None  # n_{t-1}
        self.peak: torch.Tensor | None = None  # M_{t-1}

    def multipliers(self, norms: torch.Tensor) -> torch.Tensor:
        """The multiplier of each tensor, given this iteration's per-tensor norms ``norms``."""
        n = norms.square().sum().sqrt()
        per_tensor = coef(self.limit, norms)
        first = coef(self.limit, math.sqrt(len(norms)) * norms)  # bounds the global norm by L
        if self.name == "exact":
            out = coef(self.limit, n).expand_as(norms)
        elif self.name == "tensor":
            out = per_tensor
        elif self.name == "lagged":
            out = torch.ones_like(norms) if self.prev is None else coef(self.limit, self.prev).expand_as(norms)
        elif self.name == "lagged+tensor":
            out = first if self.prev is None else torch.minimum(coef(self.limit, self.prev), per_tensor)
        elif self.name == "lagged-max":
            out = torch.ones_like(norms) if self.peak is None else coef(self.limit, self.peak).expand_as(norms)
        elif self.name == "lagged-max+tensor":
            out = first if self.peak is None else torch.minimum(coef(self.limit, self.peak), per_tensor)
        else:
            raise ValueError(f"unknown rule {self.name!r}")
        self.prev = n
        self.peak = n if self.peak is None else torch.maximum(n, DECAY * self.peak)
        return out


RULES = ("exact", "tensor", "lagged", "lagged+tensor", "lagged-max", "lagged-max+tensor")


def train(args: argparse.Namespace, seed: int, lr: float, limit: float, rule: str,
          text: torch.Tensor) -> dict[str, list[float]]:
    """One run; returns per iteration the loss, the unclipped global norm and the clipped one."""
    torch.manual_seed(seed)
    model = ByteGPT(args.layers, args.width, args.heads, args.length).to(torch.bfloat16)
    params = list(model.parameters())
    own = rule == "fusedwarm-lagged"
    opt = fusedwarm.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, warmup="none", seed=seed,
                          backward_step=own, max_grad_norm=limit if own else None, clip="lagged")
    simulated = None if own else Rule(rule, limit)
    lagged_coef = 1.0
    out: dict[str, list[float]] = {"loss": [], "norm": [], "clipped": []}
    for x, y in make_batches(text, args.steps, args.batch, args.length, seed, torch.device("cpu")):
        loss = byte_loss(model(x), y)
        loss.backward()
        if own:
            opt.step()
            n = float(opt.last_grad_norm())
            clipped = lagged_coef * n
            lagged_coef = float(coef(limit, torch.tensor(n)))
        else:
            norms = torch.stack([p.grad.float().norm() for p in params])
            mult = simulated.multipliers(norms)
            for p, m in zip(params, mult.tolist()):
                p.grad.mul_(m)
            n, clipped = float(norms.square().sum().sqrt()), float((norms * mult).square().sum().sqrt())
            opt.step()
            opt.zero_grad()
        out["loss"].append(float(loss.detach()))
        out["norm"].append(n)
        out["clipped"].append(clipped)
    return out


def summarize(run: dict[str, list[float]], limit: float) -> dict[str, float]:
    """The overshoot, step-size and loss figures of the module docstring for one run."""
    ratios = [c / limit for c in run["clipped"]]
    steps = [c / min(n, limit) for c, n in zip(run["clipped"], run["norm"])]
    return {"over_1.5x": sum(r > 1.5 for r in ratios), "max_ratio": max(ratios), "step": statistics.mean(steps),
            "loss": statistics.mean(run["loss"][-10:]), "clipped_steps": sum(n > limit for n in run["norm"])}


def render(result: dict) -> str:
    """The markdown table of the results: one row per (limit, lr, rule), summed or averaged over seeds."""
    s = result["setup"]
    lines = [f"Byte-level GPT ({s['layers']} layers, width {s['width']}), batch {s['batch']} x {s['length']} bytes, "
             f"{s['steps']} iterations, AdamW (betas 0.9, 0.95, wd 0.1, no warmup), bfloat16 weights, "
             f"seeds {s['seeds']}: counts summed, the largest ratio over all seeds, means averaged.",
             "",
             "| L | lr | rule | iterations with n_t > L | iterations over 1.5 L | largest clipped norm / L "
             "| step vs exact | final loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['limit']:g} | {row['lr']:g} | {row['rule']} | {row['clipped_steps']} "
                     f"| {row['over_1.5x']} of {row['iterations']} | {row['max_ratio']:.2f} | {row['step']:.3f} "
                     f"| {row['loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--limits", type=float, nargs="+", default=[1.0, 0.5], help="max_grad_norm L")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=list(RULES) + ["fusedwarm-lagged"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text, _ = load_text(400_000)
    rows = []
    for limit in args.limits:
        for lr in args.lrs:
            for rule in args.rules:
                per_seed = [summarize(train(args, seed, lr, limit, rule, text), limit) for seed in args.seeds]
                row = {"limit": limit, "lr": lr, "rule": rule, "iterations": args.steps * len(args.seeds),
                       "over_1.5x": sum(r["over_1.5x"] for r in per_seed),
                       "max_ratio": max(r["max_ratio"] for r in per_seed),
                       "step": statistics.mean(r["step"] for r in per_seed),
                       "loss": statistics.mean(r["loss"] for r in per_seed),
                       "clipped_steps": sum(r["clipped_steps"] for r in per_seed)}
                rows.append(row)
                print(f"L {limit:g} lr {lr:g} {rule:>18}: over 1.5L {row['over_1.5x']:3d}/{row['iterations']}, "
                      f"max {row['max_ratio']:.2f} L, step {row['step']:.3f}, loss {row['loss']:.4f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": {"device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "commit": commit},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lagged_clipping.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "lagged_clipping.md").write_text(render(result) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
