"""DESIGN.md's layering: the float32 reference never touches the compiled extension (that the CUDA
kernel files include no torch header is checked in tests/test_nvcc.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_imports_no_fusedwarm_module():
    tree = ast.parse((ROOT / "fusedwarm" / "reference.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert not any(name.startswith(".") or name.startswith("fusedwarm") for name in imported), imported


def test_reference_runs_without_loading_the_extension(tmp_path):
    code = textwrap.dedent(
        """
        import torch
        from fusedwarm import reference
        p = torch.nn.Parameter(torch.randn(16, dtype=torch.bfloat16))
        opt = reference.AdamW([p], lr=1e-2)
        p.grad = torch.randn_like(p)
        opt.step()
        maps = open("/proc/self/maps").read()
        assert not [line for line in maps.splitlines() if "fusedwarm" in line], "a fusedwarm library is mapped"
        assert not hasattr(torch.ops.fusedwarm, "adamw_")
        print("ok")
        """
    )
    # An empty cache directory: even a stray build attempt would have nothing to load.
    env = dict(os.environ, PYTHONPATH=str(ROOT), FUSEDWARM_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
