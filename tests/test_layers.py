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


def _imported_names(path: Path) -> set[str]:
    """The modules a file of fusedwarm/reference/ imports; ``from .x`` is named ``fusedwarm.reference.x``."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.add("fusedwarm.reference" + ("." + node.module if node.module else ""))
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    return imported


def test_reference_imports_no_fusedwarm_module():
    # A module of the package may import its siblings (``from .pam import ...``), nothing else of fusedwarm.
    package = ROOT / "fusedwarm" / "reference"
    files = sorted(package.rglob("*.py"))
    assert package / "__init__.py" in files and not (ROOT / "fusedwarm" / "reference.py").exists()
    for path in files:
        outside = {name for name in _imported_names(path) if name.startswith(".") or (
            name.startswith("fusedwarm") and not (name == "fusedwarm.reference"
                                                  or name.startswith("fusedwarm.reference.")))}
        assert not outside, (path.relative_to(ROOT), outside)


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
