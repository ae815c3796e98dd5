"""The JIT build: a fresh cache builds each entry once under concurrency, only the variants a run
uses are compiled, a built cache loads fast, failed compiles leave nothing behind, missing tools
give errors that say what to install, the CLI prebuilds and reports, setup.py installs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusedwarm import _build

ROOT = Path(__file__).resolve().parents[1]

BUILD_AND_STEP = textwrap.dedent(
    """
    import logging, time, torch
    from fusedwarm import _build
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    start = time.perf_counter()
    _build.build()
    import fusedwarm
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    before = p.detach().clone()
    opt = fusedwarm.AdamW([p], lr=1e-2, warmup="none")  # the first step must move the bf16 weight
    p.grad = torch.randn_like(p)
    opt.step()
    elapsed = time.perf_counter() - start
    assert not torch.equal(p.detach(), before)
    print(f"ELAPSED {elapsed:.3f}")
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
def fresh_cache(tmp_path_factory) -> tuple[Path, list[str]]:
    """A cache built from scratch by two processes started together; their stderr."""
    cache = tmp_path_factory.mktemp("cache")
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD_AND_STEP], env=_env(cache), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    return cache, [err for _, err in results]


def _built(stderr: list[str]) -> list[str]:
    return [line.split()[2] for err in stderr for line in err.splitlines()
            if line.startswith("fusedwarm._build built ")]


def test_concurrent_processes_build_each_entry_once(fresh_cache):
    cache, stderr = fresh_cache
    built = _built(stderr)
    # The torch-facing library and the one variant the step used, each by exactly one process.
    assert len(built) == 2 and len(set(built)) == 2, built
    libraries = list(cache.glob("core-*/fusedwarm_core.so"))
    variants = list((cache / "variants" / "cpu").glob("*.so"))
    assert len(libraries) == 1 and [v.name.split("-")[0] for v in variants] == ["adamw.bf16x16.bf16.ieee"], variants
    leftovers = [p for p in cache.rglob(".*") if p.is_dir()]
    assert not leftovers, f"temporary build directories left behind: {leftovers}"


def test_cached_load_is_fast(fresh_cache):
    cache, _ = fresh_cache
    result = _run(BUILD_AND_STEP, _env(cache))
    assert result.returncode == 0, result.stderr
    assert not _built([result.stderr]), result.stderr
    assert _elapsed(result.stdout) < 3.0, result.stdout


def test_cli_build_and_info(fresh_cache):
    cache, _ = fresh_cache
    env = _env(cache)
    build = subprocess.run([sys.executable, "-m", "fusedwarm", "build", "--variants", "sgd.f32.f32.ieee,lion.f32.f32.pam"],
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "sgd.f32.f32.ieee" in build.stdout and "lion.f32.f32.pam" in build.stdout
    names = sorted(p.name.split("-")[0] for p in (cache / "variants" / "cpu").glob("*.so"))
    assert names == ["adamw.bf16x16.bf16.ieee", "lion.f32.f32.pam", "sgd.f32.f32.ieee"]
    info = subprocess.run([sys.executable, "-m", "fusedwarm", "info"], env=env, capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert str(cache) in info.stdout
    total = len(_build.step_variants())
    assert re.search(rf"^cpu kernels +3 of {total} step variants", info.stdout, re.MULTILINE), info.stdout
    assert "torch-facing library" in info.stdout and "yes" in info.stdout


def test_cli_rejects_unknown_variant(fresh_cache):
    cache, _ = fresh_cache
    build = subprocess.run([sys.executable, "-m", "fusedwarm", "build", "--variants", "adamw.bf16x5.f32.ieee"],
                           env=_env(cache), capture_output=True, text=True)
    assert build.returncode != 0
    assert "unknown kernel variant 'adamw.bf16x5.f32.ieee'" in build.stderr
    assert "Traceback" not in build.stderr


def test_missing_compiler_is_named(tmp_path):
    env = _env(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler"))
    result = _run("from fusedwarm import _build\n_build.build()", env)
    assert result.returncode != 0
    assert "C++ compiler" in result.stderr and "no-such-compiler" in result.stderr


def test_failed_compile_leaves_no_entry(tmp_path, monkeypatch):
    # A "compiler" that reports its version, then fails every compile.
    fake = tmp_path / "failing-c++"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'failing-c++ 1.0'; exit 0; fi\n"
                    "echo 'error: this compiler always fails' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("FUSEDWARM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(_build.BuildError, match="this compiler always fails"):
        _build.variant_file("cpu", "adamw.f32.f32.ieee")
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not left, f"a failed compile left {left}"


def test_missing_cupy_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    _build._nvrtc.cache_clear()
    try:
        with pytest.raises(_build.BuildError, match=r"pip install cupy-cuda1\dx") as info:
            _build._nvrtc()
        assert "no CUDA toolkit is needed" in str(info.value)
    finally:
        _build._nvrtc.cache_clear()


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
    assert (pkg / "csrc" / "ops.cpp").is_file() and (pkg / "csrc" / "cuda" / "step_variant.cu").is_file()
    assert (pkg / "csrc" / "include" / "fusedwarm" / "update.cuh").is_file()
    assert not list(pkg.glob("_C*.so")), "the default install must not build the extension ahead of time"


def test_variant_build_error_reaches_the_caller(tmp_path, monkeypatch):
    """A variant that fails to compile on first use raises the BuildError (what to install or fix) from
    step(), through the C++ library's request for it, and changes nothing."""
    import torch

    import fusedwarm

    fusedwarm.AdamW([torch.nn.Parameter(torch.randn(2))])  # the torch-facing library, from the usual cache
    monkeypatch.setenv("FUSEDWARM_CACHE_DIR", str(tmp_path))  # no variant cached here

    def failing(commands, what, verbose):
        raise _build.BuildError(f"compiling {what} failed: the compiler is broken (test)")

    monkeypatch.setattr(_build, "_run_compilers", failing)
    p = torch.nn.Parameter(torch.randn(33, dtype=torch.float16))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt = fusedwarm.Lion([p], lr=1e-2, extra_bits=8, arithmetic="pam")
    with pytest.raises(_build.BuildError, match=r"kernel variant lion\.f16x8\.bf16\.pam \(cpu\) failed: the compiler "
                                                r"is broken"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert int(opt.state[p]["step"]) == 0, "the step counter of a step that did not happen"
    assert not list(tmp_path.rglob("*.so"))


def test_emulated_variant_key_follows_its_emulator_library(monkeypatch):
    """An emulated variant links against one emulator library by path: another library (new sources,
    compiler or cache) must give another variant, not reuse one that would load the old library."""
    name = "adamw.bf16x16.bf16.ieee"
    before = _build.variant_path("emu", name)
    lib = _build.library("emu")
    moved = _build.Library(lib.kind, lib.units, lib.flags, lib.include_dirs,
                           lib.path.parent.with_name(lib.path.parent.name + "-other") / lib.path.name)
    monkeypatch.setattr(_build, "library", lambda kind="core": moved)
    assert _build.variant_path("emu", name) != before
