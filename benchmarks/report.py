"""Renders the committed benchmark results as markdown and, with ``--update-readme``, writes them
into README.md between markers: the step benchmark between ``<!-- step-results:begin -->`` /
``end``, and the markdown tables that the other scripts write (``MARKDOWN_BLOCKS``: training
loop, warmup experiment, PAM experiment) between ``<!-- NAME:begin -->`` / ``end``; so the
README's numbers always come from a result file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# README block name -> the result file (written by its benchmark script) copied into it.
MARKDOWN_BLOCKS = {
    "train-loop-results": RESULTS / "train_loop_cpu.md",
    "warmup-experiment-results": RESULTS / "warmup_experiment.md",
    "pam-experiment-results": RESULTS / "pam_experiment.md",
}


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    env, h2h = d["environment"], d["head_to_head"]
    lines = [
        f"From `{path.relative_to(ROOT)}` ({env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, "
        f"commit {env['git_commit'][:10]}, {d['config']['params']:,} parameters in {d['config']['tensors']} tensors; "
        f"copy bandwidth {d['copy_bandwidth_gbps']:.1f} GB/s):",
        "",
        "| optimizer | bytes moved / param | ms / step | GB/s | of copy bw |",
        "|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        if r["error"]:
            lines.append(f"| {r['name']} | – | error: {r['error']} | | |")
            continue
        lines.append(f"| {r['name']} | {r['bytes_moved_per_param']:.0f} | {r['median_ms']:.2f} | "
                     f"{r['effective_gbps']:.1f} | {100 * r['fraction_of_copy']:.0f}% |")
    verdict = "meets" if h2h["meets_target"] else "misses"
    lines += [
        "",
        f"Head to head, timed interleaved: {h2h['candidate']['name']} {h2h['candidate']['median_ms']:.2f} ms vs "
        f"{h2h['baseline']['name']} {h2h['baseline']['median_ms']:.2f} ms per step, speedup "
        f"{h2h['speedup']:.2f}x: this {verdict} the CPU target of {h2h['target']}x.",
    ]
    return "\n".join(lines)


def replace_block(content: str, name: str, text: str) -> str:
    """``content`` with the text between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->`` replaced."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS / "step_cpu.json")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    text = render(args.results.resolve())
    blocks = {name: path.read_text().strip() for name, path in MARKDOWN_BLOCKS.items()}
    if not args.update_readme:
        print(text, *blocks.values(), sep="\n\n")
        return
    readme = ROOT / "README.md"
    content = replace_block(readme.read_text(), "step-results", text)
    for name, block in blocks.items():
        content = replace_block(content, name, block)
    readme.write_text(content)


if __name__ == "__main__":
    main()
