"""Train a small byte-level language model three times: torch.optim.AdamW on float32 weights, then
fusedwarm.AdamW on bfloat16 weights, exact and with 8-bit states.

Run it with ``python -m fusedwarm.demo`` (``--help`` for options). The text is the source code of
a few Python standard-library modules, so nothing is downloaded. Both runs start from the same
initial weights (rounded to bfloat16 for the second) and see the same batches in the same order;
the second also computes its forward and backward passes in bfloat16.

The fusedwarm run keeps no float32 copy of the weights: each bfloat16 weight carries 16 extra
bits in an int16 tensor, which together *are* the float32 master weight (Lewandowski & Kosson
2023, arXiv 2309.12381), and the Adam moments are bfloat16 with stochastic rounding. It should
reach about the same loss while holding 8 bytes per parameter (weights + optimizer state)
instead of 12. The third run keeps 8 extra bits and block-quantized 8-bit moments
(``state_dtype="int8"``): about 5 bytes per parameter. It is a demonstration, not a benchmark: the
README's numbers come from ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fusedwarm

# Standard-library modules whose source is the training text.
TEXT_MODULES = ("argparse", "collections", "dataclasses", "functools", "inspect", "json.decoder", "textwrap", "typing")
EMBED = 32  # width of each byte's embedding


def load_text() -> torch.Tensor:
    """The UTF-8 bytes of the source files of a few standard-library modules, as a uint8 tensor."""
    parts = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getsource(module).encode("utf-8"))
    return torch.frombuffer(bytearray(b"\n\n".join(parts)), dtype=torch.uint8)


class ByteMLP(nn.Module):
    """A byte-level MLP language model (after Bengio et al. 2003): each byte is predicted from the
    ``context`` bytes before it, whose embeddings are concatenated and fed through two hidden layers."""

    def __init__(self, context: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, embed)
        self.net = nn.Sequential(
            nn.Linear(context * embed, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 256),
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for the byte after each position of ``idx`` (batch, length) -> (batch, length, 256)."""
        padded = F.pad(idx, (self.context - 1, 0))  # byte 0 before the start of a window
        windows = padded.unfold(1, self.context, 1)  # (batch, length, context): bytes up to each position
        return self.net(self.embed(windows).flatten(2))


def batches(data: torch.Tensor, steps: int, batch: int, length: int, seed: int) -> list[torch.Tensor]:
    """Every step's batch of ``length + 1``-byte windows of ``data``, drawn once so that both runs
    see the same data: bytes [:-1] are the input, bytes [1:] the targets."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (steps, batch), generator=gen)
    offsets = torch.arange(length + 1)
    return [data[s[:, None] + offsets].long() for s in starts]


def state_bytes_per_param(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """(weights + every optimizer state tensor) bytes / number of parameters, from the real tensors
    (a fusedwarm optimizer's own count, ``opt.state_bytes()``, which also holds its loss-scale and
    clipping scalars)."""
    params = list(model.parameters())
    if isinstance(opt, fusedwarm.FusedOptimizer):
        total = opt.state_bytes()["total"]
    else:
        total = sum(p.nbytes for p in params)
        total += sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return total / sum(p.numel() for p in params)


def train(label: str, model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor], log_every: int) -> dict:
    """Trains on ``data`` (one batch per step); returns losses and timings."""
    losses, step_times, opt_times = [], [], []
    start = time.perf_counter()
    for i, xy in enumerate(data):
        t0 = time.perf_counter()
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 256), xy[:, 1:].reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        if (i + 1) % log_every == 0 or i + 1 == len(data):
            recent = statistics.fmean(losses[-log_every:])
            print(f"  [{label}] step {i + 1:4d}/{len(data)}  loss {recent:.3f}  ({time.perf_counter() - start:.1f} s)",
                  flush=True)
    return {"losses": losses, "step_ms": 1e3 * statistics.median(step_times),
            "opt_ms": 1e3 * statistics.median(opt_times), "bytes": state_bytes_per_param(model, opt)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusedwarm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default: 200)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--length", type=int, default=64, help="predicted bytes per sequence (default: 64)")
    parser.add_argument("--context", type=int, default=16, help="bytes the model sees before each one (default: 16)")
    parser.add_argument("--hidden", type=int, default=384, help="hidden layer width (default: 384)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    text = load_text()
    data = batches(text, args.steps, args.batch, args.length, args.seed)
    init = ByteMLP(args.context, EMBED, args.hidden).state_dict()
    n_params = sum(t.numel() for t in init.values())
    print(f"data: {len(text):,} bytes of Python standard-library source ({', '.join(TEXT_MODULES)})")
    print(f"model: byte-level MLP language model, {args.context} bytes of context, {n_params:,} parameters")
    print(f"training: {args.steps} steps of {args.batch} x {args.length} bytes, AdamW lr {args.lr}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    hyper = dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)

    def fresh(dtype: torch.dtype) -> nn.Module:
        model = ByteMLP(args.context, EMBED, args.hidden)
        model.load_state_dict(init)
        return model.to(dtype)

    results = {}
    print("1) torch.optim.AdamW, float32 weights")
    model = fresh(torch.float32)
    results["torch.optim.AdamW, fp32 weights"] = train(
        "torch fp32", model, torch.optim.AdamW(model.parameters(), **hyper), data, log_every=20)

    print("\n2) fusedwarm.AdamW, bfloat16 weights + 16 extra bits, bfloat16 states")
    print("  loading the fusedwarm extension (compiled on first use; this can take a minute) ...", flush=True)
    model = fresh(torch.bfloat16)
    t0 = time.perf_counter()
    # warmup="none": the same update rule as the torch.optim.AdamW it is compared with.
    opt = fusedwarm.AdamW(model.parameters(), **hyper, extra_bits=16, state_dtype=torch.bfloat16, seed=args.seed,
                          warmup="none")
    print(f"  extension ready after {time.perf_counter() - t0:.1f} s", flush=True)
    results["fusedwarm.AdamW, bf16 weights"] = train("fusedwarm bf16", model, opt, data, log_every=20)

    print("\n3) fusedwarm.AdamW, bfloat16 weights + 8 extra bits, 8-bit block-quantized states")
    model = fresh(torch.bfloat16)
    opt = fusedwarm.AdamW(model.parameters(), **hyper, extra_bits=8, state_dtype="int8", seed=args.seed, warmup="none")
    results["fusedwarm.AdamW, bf16 + int8 states"] = train("fusedwarm int8", model, opt, data, log_every=20)

    tail = min(20, args.steps)
    head = f"{'optimizer':<38}{f'final loss (last {tail})':>24}{'bytes/param':>13}{'ms/step':>9}{'ms in step()':>14}"
    print(f"\n{head}\n{'-' * len(head)}")
    for name, r in results.items():
        print(f"{name:<38}{statistics.fmean(r['losses'][-tail:]):>24.4f}{r['bytes']:>13.2f}{r['step_ms']:>9.1f}"
              f"{r['opt_ms']:>14.2f}")
    print("\nloss: mean cross-entropy (nats/byte) of the last steps' batches. bytes/param: weights + optimizer")
    print("states (moments, extra bits, block scales, step counters) over the parameter count, gradients not")
    print("included.")
    print("ms/step: median of forward + backward + optimizer step; ms in step(): median of optimizer.step().")


if __name__ == "__main__":
    main()
