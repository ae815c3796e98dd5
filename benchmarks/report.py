"""Writes the committed benchmark results into README.md: the markdown tables that the benchmark
scripts write next to their JSON (``MARKDOWN_BLOCKS``: step benchmark and its repeated runs, training
benchmark, training and step time with block-quantized states, training loop, warmup experiment, PAM experiment, lagged clipping, FSDP2 memory per rank, JIT
build times) go
between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->``, so the README's numbers always come from a result
file. Without ``--update-readme`` it prints them."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# README block name -> the result file (written by its benchmark script) copied into it.
MARKDOWN_BLOCKS = {
    "step-results": RESULTS / "step_cpu.md",
    "step-runs-results": RESULTS / "step_cpu_runs_default.md",
    "train-results": RESULTS / "train_cpu.md",
    "train-quantized-results": RESULTS / "train_cpu_quantized.md",
    "step-quantized-results": RESULTS / "step_cpu_quantized.md",
    "train-loop-results": RESULTS / "train_loop_cpu.md",
    "warmup-experiment-results": RESULTS / "warmup_experiment.md",
    "pam-experiment-results": RESULTS / "pam_experiment.md",
    "lagged-clipping-results": RESULTS / "lagged_clipping.md",
    "fsdp-memory-results": RESULTS / "fsdp_memory_cpu.md",
    "jit-results": RESULTS / "jit_build.md",
}


def replace_block(content: str, name: str, text: str) -> str:
    """``content`` with the text between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->`` replaced."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    missing = [str(path.relative_to(ROOT)) for path in MARKDOWN_BLOCKS.values() if not path.exists()]
    if missing:
        parser.error(f"no result file {', '.join(missing)}: run the benchmark that writes it first (the README's "
                     f"'Regenerate' line under each result says how)")
    blocks = {name: path.read_text().strip() for name, path in MARKDOWN_BLOCKS.items()}
    if not args.update_readme:
        print(*blocks.values(), sep="\n\n")
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    for name, block in blocks.items():
        content = replace_block(content, name, block)
    readme.write_text(content)


if __name__ == "__main__":
    main()
