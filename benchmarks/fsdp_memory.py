"""FSDP2 memory benchmark: the persistent training state each rank holds, counted tensor by tensor.

The byte-level GPT of ``benchmarks/models.py`` (``ByteGPT``) is sharded with FSDP2
(``torch.distributed.fsdp.fully_shard`` on every transformer block, then on the root) over a
one-dimensional CPU mesh of 1 and 2 ranks (gloo, one thread per rank, ``torch.multiprocessing``),
and trained for one step on a batch of byte windows of the Python standard library's source (each
rank its own windows). The configurations:

* ``fusedwarm-x16``: ``fusedwarm.AdamW(extra_bits=16, state_dtype=torch.bfloat16)`` on bfloat16
  weights; backward, then ``step()``;
* ``fusedwarm-x16-bs``: the same with ``backward_step=True``: each sharded gradient is consumed in
  the post-accumulate-grad hook that FSDP2 calls after its reduce-scatter (in buckets of
  ``--bucket-cap-mb``), so no gradient is held after backward;
* ``fusedwarm-x0-bs``: ``extra_bits=0`` (bfloat16 weights with stochastic rounding, no extra
  bits), bfloat16 states, ``backward_step=True``;
* ``torch-fp32``: ``torch.optim.AdamW`` on float32 weights, the usual full-precision baseline
  (float32 parameters, gradients, ``exp_avg`` and ``exp_avg_sq``).

Every (configuration, world size) runs in fresh processes. Each rank counts the bytes of the
*local* tensors it holds (``DTensor.to_local()``; ``numel() * element_size()``, not
``untyped_storage().nbytes()``, since FSDP2 pads the storage of uneven shards):

* parameters: the local shards of the sharded parameters (after the step);
* extra bits: ``opt.state[p]["extra"]`` (fusedwarm's low bits of the float32 master weight);
* optimizer states: ``exp_avg`` + ``exp_avg_sq`` + the ``step`` tensors (fusedwarm's 0-dim
  int64, torch's 0-dim float32), and any other per-parameter state tensor;
* gradients: the local ``.grad`` shards held at the end of backward, i.e. just before
  ``opt.step()`` (0 with ``backward_step=True``). The most gradient bytes held at once during
  backward (sampled in post-accumulate-grad hooks registered after the optimizer's) is in the JSON.

Bytes per parameter: the total over (model parameters / ranks). Not counted: activations, FSDP2's
unsharded (all-gathered) parameters and gradients, which live only during forward/backward,
communication buffers and other temporaries. The process's peak resident set size growth
(``resource.getrusage``, from before the model is built to after the step) is in the JSON, for
reference only.

Run from the repository root::

    PYTHONPATH=. python benchmarks/fsdp_memory.py     # about a minute on 2 cores

Results go to ``benchmarks/results/fsdp_memory_cpu.json`` (environment, model config, every
rank's counts) and ``benchmarks/results/fsdp_memory_cpu.md`` (a table; ``benchmarks/report.py``
copies it into README.md), which is printed as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fusedwarm
from fusedwarm import _ops
from models import ByteGPT, byte_loss, load_text, make_batches
from step import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MB = 1e6
CONFIGS = {
    # name: (weight dtype, optimizer, keyword arguments)
    "fusedwarm-x16": (torch.bfloat16, "fusedwarm",
                      dict(extra_bits=16, state_dtype=torch.bfloat16, backward_step=False)),
    "fusedwarm-x16-bs": (torch.bfloat16, "fusedwarm",
                         dict(extra_bits=16, state_dtype=torch.bfloat16, backward_step=True)),
    "fusedwarm-x0-bs": (torch.bfloat16, "fusedwarm",
                        dict(extra_bits=0, state_dtype=torch.bfloat16, backward_step=True)),
    "torch-fp32": (torch.float32, "torch", dict()),
}
DESCRIPTIONS = {
    "fusedwarm-x16": "fusedwarm.AdamW(extra_bits=16, state_dtype=bfloat16), bf16 weights",
    "fusedwarm-x16-bs": "fusedwarm.AdamW(extra_bits=16, state_dtype=bfloat16, backward_step=True), bf16 weights",
    "fusedwarm-x0-bs": "fusedwarm.AdamW(extra_bits=0, state_dtype=bfloat16, backward_step=True), bf16 weights",
    "torch-fp32": "torch.optim.AdamW, fp32 weights",
}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of the tensor this rank holds: the local shard of a DTensor, without FSDP2's padding."""
    if isinstance(t, torch.distributed.tensor.DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def grad_bytes(params: list[torch.Tensor]) -> int:
    return sum(local_bytes(p.grad) for p in params if p.grad is not None)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def make_optimizer(config: str, params: list[torch.Tensor], args: argparse.Namespace):
    _, kind, kw = CONFIGS[config]
    if kind == "torch":
        return torch.optim.AdamW(params, lr=args.lr)
    extra = dict(bucket_cap_mb=args.bucket_cap_mb) if kw["backward_step"] else {}
    return fusedwarm.AdamW(params, lr=args.lr, seed=args.seed, **kw, **extra)


def measure(rank: int, world: int, mesh, config: str, args: argparse.Namespace) -> dict:
    from torch.distributed.fsdp import fully_shard

    dtype = CONFIGS[config][0]
    text, _ = load_text(args.text_bytes)
    x, y = make_batches(text, 1, args.batch, args.seq, args.seed * 1000 + rank, torch.device("cpu"))[0]
    rss_before = peak_rss_bytes()

    torch.manual_seed(args.seed)
    model = ByteGPT(args.layers, args.dim, args.heads, args.seq).to(dtype)
    model_params = sum(p.numel() for p in model.parameters())
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    opt = make_optimizer(config, params, args)

    # The most gradient bytes held at once during backward, sampled after each gradient arrives
    # (these hooks run after the optimizer's, which with backward_step may consume it).
    peak = {"grads": 0, "samples": 0}

    def sample(_p: torch.Tensor) -> None:
        peak["grads"] = max(peak["grads"], grad_bytes(params))
        peak["samples"] += 1

    hooks = [p.register_post_accumulate_grad_hook(sample) for p in params]

    loss = byte_loss(model(x), y)
    loss.backward()
    grads = grad_bytes(params)  # held at the end of backward, just before step()
    peak["grads"] = max(peak["grads"], grads)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()

    counts = {"params": 0, "extra": 0, "states": 0, "other_states": 0}
    other_keys: set[str] = set()
    for p in params:
        counts["params"] += local_bytes(p)
        for key, value in opt.state[p].items():
            if not isinstance(value, torch.Tensor):
                continue
            if key == "extra":
                counts["extra"] += local_bytes(value)
            elif key in STATE_KEYS:
                counts["states"] += local_bytes(value)
            else:
                counts["other_states"] += local_bytes(value)
                other_keys.add(key)
    counts["states"] += counts.pop("other_states")
    local_params = sum(local_bytes(p) // p.element_size() for p in params)
    total = counts["params"] + counts["extra"] + counts["states"] + grads
    state_keys = sorted({k for p in params for k in opt.state[p]})
    return {
        "rank": rank,
        "model_params": model_params,
        "local_params": local_params,
        "param_tensors": len(params),
        "params_bytes": counts["params"],
        "extra_bytes": counts["extra"],
        "states_bytes": counts["states"],
        "grads_bytes": grads,
        "total_bytes": total,
        "bytes_per_param": total / (model_params / world),
        "bytes_per_local_param": total / local_params if local_params else None,
        "peak_grads_bytes_during_backward": peak["grads"],
        "grad_hook_samples": peak["samples"],
        "state_keys": state_keys,
        "other_state_keys": sorted(other_keys),
        "weight_dtype": str(dtype),
        "loss": loss.item(),
        "peak_rss_growth_bytes": peak_rss_bytes() - rss_before,
    }


def worker(rank: int, world: int, port: int, out_dir: str, config: str, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        mesh = init_device_mesh("cpu", (world,))
        result = measure(rank, world, mesh, config, args)
        with open(os.path.join(out_dir, f"{config}-world{world}-rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, world: int, args: argparse.Namespace, out_dir: str) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), out_dir, config, args), nprocs=world, join=True)
    ranks = []
    for r in range(world):
        with open(os.path.join(out_dir, f"{config}-world{world}-rank{r}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def markdown(rows: list[dict], env: dict, model: dict, args: argparse.Namespace) -> str:
    lines = [
        f"FSDP2 memory per rank (torch {env['torch']}, gloo on CPU, 1 thread per rank, commit "
        f"{(env['git_commit'] or '?')[:10]}): byte-level GPT, {model['layers']} layers, width {model['dim']}, "
        f"{model['heads']} heads, {model['params']:,} parameters in {model['param_tensors']} tensors, "
        f"`fully_shard` on each block and the root; one step on a batch of {args.batch} x {args.seq} bytes.",
        "",
        "| configuration | ranks | params/rank MB | extra MB | states MB | grads MB | total MB | bytes/param |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["ranks"]:
            name = row["config"] if row["world"] == 1 else f"{row['config']} (rank {r['rank']})"
            lines.append(
                f"| {name} | {row['world']} | {r['params_bytes'] / MB:.3f} | {r['extra_bytes'] / MB:.3f} | "
                f"{r['states_bytes'] / MB:.3f} | {r['grads_bytes'] / MB:.3f} | {r['total_bytes'] / MB:.3f} | "
                f"{r['bytes_per_param']:.2f} |")
    lines += [
        "",
        "Configurations: " + "; ".join(f"`{k}` = {v}" for k, v in DESCRIPTIONS.items())
        + f" (backward_step buckets of {args.bucket_cap_mb:g} MB).",
        "",
        "Measured by counting, on each rank after one training step, the bytes of the local tensors it holds "
        "(`DTensor.to_local()`, `numel() * element_size()`, not the padded storage): the sharded parameters, "
        "fusedwarm's extra bits, the optimizer states (exp_avg, exp_avg_sq and step tensors) and the local "
        "gradient shards held at the end of backward (just before `opt.step()`); bytes/param = total / "
        "(model parameters / ranks); activations, FSDP2's temporary unsharded parameters and gradients and "
        "communication buffers are not counted. Reproduce: `PYTHONPATH=. python benchmarks/fsdp_memory.py`.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated (default: all)")
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes (default: 1,2)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: 4)")
    parser.add_argument("--dim", type=int, default=256, help="model width (default: 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--seq", type=int, default=128, help="bytes per window (default: 128)")
    parser.add_argument("--batch", type=int, default=8, help="windows per rank (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bucket-cap-mb", type=float, default=1.0,
                        help="fusedwarm's bucket_cap_mb with backward_step (default: 1)")
    parser.add_argument("--text-bytes", type=int, default=1 << 20, help="bytes of text to draw windows from")
    parser.add_argument("--out", type=Path, default=RESULTS / "fsdp_memory_cpu")
    args = parser.parse_args(argv)
    for c in args.configs.split(","):
        if c not in CONFIGS:
            parser.error(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (dist.is_available() and dist.is_gloo_available()):
        sys.exit("needs torch.distributed with the gloo backend")
    started = time.perf_counter()
    _ops.load()  # build the extension once here, not in every worker
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for world in worlds:
            for config in args.configs.split(","):
                t0 = time.perf_counter()
                ranks = run(config, world, args, out_dir)
                rows.append({"config": config, "world": world, "ranks": ranks,
                             "seconds": time.perf_counter() - t0})
                print(f"{config} x{world}: " + ", ".join(
                    f"rank {r['rank']} {r['total_bytes'] / MB:.3f} MB = {r['bytes_per_param']:.2f} B/param"
                    for r in ranks), flush=True)
    first = rows[0]["ranks"][0]
    model = {"class": "benchmarks.models.ByteGPT", "layers": args.layers, "dim": args.dim, "heads": args.heads,
             "seq": args.seq, "tie": False, "params": first["model_params"],
             "param_tensors": first["param_tensors"],
             "sharding": "fully_shard(block) for each block, then fully_shard(root); 1-D mesh, Shard(0)"}
    env = environment(torch.device("cpu"))
    env["torch_threads"] = 1  # per rank (the parent's count is not the workers')
    env["backend"] = "gloo"
    env["world_sizes"] = worlds
    elapsed = time.perf_counter() - started
    result = {
        "benchmark": "fsdp_memory",
        "environment": env,
        "model": model,
        "batch": args.batch,
        "bucket_cap_mb": args.bucket_cap_mb,
        "lr": args.lr,
        "seed": args.seed,
        "configs": {k: DESCRIPTIONS[k] for k in args.configs.split(",")},
        "counting": "local tensors only (DTensor.to_local()), numel() * element_size(); grads held just "
                    "before opt.step(); bytes_per_param = total_bytes / (model_params / world)",
        "rows": rows,
        "seconds": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(rows, env, model, args)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\n{elapsed:.1f} s; wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
