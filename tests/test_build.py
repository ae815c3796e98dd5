"""The JIT build: a fresh cache builds once under concurrency, a built cache loads fast, missing
tools give errors that say what to install, the CLI reports the build, setup.py installs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD_AND_STEP = textwrap.dedent(
    """
    import time, torch
    from fusedwarm import _build
    start = time.perf_counter()
    cfg = _build.build()
    elapsed = time.perf_counter() - start
    import fusedwarm
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    before = p.detach().clone()
    opt = fusedwarm.AdamW([p], lr=1e-2, warmup="none")  # the first step must move the bf16 weight
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before)
    print(f"ELAPSED {elapsed:.3f} DIR {cfg.directory}")
    """
)


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, FUSEDWARM_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


def _elapsed(out: str) -> float:
    return float(out.split("ELAPSED ")[1].split()[0])


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> Path:
    """A cache built from scratch by two processes started together."""
    cache = tmp_path_factory.mktemp("cache")
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD_AND_STEP], env=_env(cache), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    return cache


def test_concurrent_processes_build_once(fresh_cache):
    builds = list(fresh_cache.glob("*/*.so"))
    assert len(builds) == 1, builds
    # .ninja_log has one line per build edge run: each object and the library exactly once.
    log = (builds[0].parent / ".ninja_log").read_text().splitlines()
    outputs = [line.split("\t")[3] for line in log if not line.startswith("#")]
    assert any(o.endswith(".o") for o in outputs), outputs
    assert len(outputs) == len(set(outputs)), f"something was built twice: {outputs}"


def test_cached_load_is_fast(fresh_cache):
    result = _run(BUILD_AND_STEP, _env(fresh_cache))
    assert result.returncode == 0, result.stderr
    assert _elapsed(result.stdout) < 3.0, result.stdout


def test_cli_info_and_build(fresh_cache):
    env = _env(fresh_cache)
    build = subprocess.run([sys.executable, "-m", "fusedwarm", "build"], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "ready" in build.stdout
    info = subprocess.run([sys.executable, "-m", "fusedwarm", "info"], env=env, capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    lines = dict(line.split(None, 1) if " " in line else (line, "") for line in info.stdout.splitlines())
    assert lines["backend"].strip() == "cpu"
    assert lines["ready"].strip() == "yes"
    assert str(fresh_cache) in lines["cache"]
    assert "torch" in lines
    assert str(fresh_cache) in lines["emulated"] and "built on first use" in lines["emulated"]


def test_missing_ninja_is_named(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("c++", "g++", "gcc", "cc"):
        found = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if found:
            (bindir / tool).symlink_to(found)
    env = _env(tmp_path / "cache", PATH=str(bindir))
    result = _run("from fusedwarm import _build\n_build.build()", env)
    assert result.returncode != 0
    assert "ninja" in result.stderr and "pip install ninja" in result.stderr


def test_missing_compiler_is_named(tmp_path):
    env = _env(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler"))
    result = _run("from fusedwarm import _build\n_build.build()", env)
    assert result.returncode != 0
    assert "C++ compiler" in result.stderr and "no-such-compiler" in result.stderr


def test_setup_py_installs_package_with_sources(tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    pkg = target / "fusedwarm"
    assert (pkg / "optim" / "__init__.py").is_file() and (pkg / "reference" / "__init__.py").is_file()
    assert (pkg / "csrc" / "ops.cpp").is_file()
    assert (pkg / "csrc" / "include" / "fusedwarm" / "update.cuh").is_file()
    assert not list(pkg.glob("_C*.so")), "the default install must not build the extension ahead of time"
