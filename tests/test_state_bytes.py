"""``opt.state_bytes()``: the persistent state an optimizer holds, by kind, against the bytes each
configuration must keep per parameter (DESIGN.md's memory table)."""

from __future__ import annotations

import pytest
import torch

import fusedwarm

SHAPES = [(64, 48), (48,), (7, 5, 3)]
N = sum(torch.Size(s).numel() for s in SHAPES)

# (optimizer, options, weight dtype, expected bytes per parameter: weights, extra bits, states)
CASES = [
    ("AdamW", dict(extra_bits=16, state_dtype=torch.bfloat16), torch.bfloat16, (2, 2, 4)),
    ("AdamW", dict(extra_bits=8, state_dtype=torch.bfloat16), torch.bfloat16, (2, 1, 4)),
    ("AdamW", dict(extra_bits=0, state_dtype=torch.float32), torch.float16, (2, 0, 8)),
    ("AdamW", dict(state_dtype=torch.float32), torch.float32, (4, 0, 8)),
    ("SGD", dict(momentum=0.0, extra_bits=16), torch.bfloat16, (2, 2, 0)),
    ("SGD", dict(momentum=0.9, extra_bits=8, state_dtype=torch.bfloat16), torch.bfloat16, (2, 1, 2)),
    ("Lion", dict(extra_bits=16, state_dtype=torch.bfloat16), torch.bfloat16, (2, 2, 2)),
]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


@pytest.mark.parametrize("name,options,dtype,per_param", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in CASES])
def test_state_bytes_by_kind(name, options, dtype, per_param):
    params = _params(dtype)
    opt = getattr(fusedwarm, name)(params, lr=1e-3, **options)
    before = opt.state_bytes()
    assert (before["weights"], before["extra_bits"], before["states"]) == (per_param[0] * N, 0, 0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    after = opt.state_bytes()
    assert (after["weights"], after["extra_bits"], after["states"]) == tuple(b * N for b in per_param)
    # Step counters (8 bytes per tensor) and the optimizer's scalars: small, counted, never per element.
    assert 8 * len(SHAPES) <= after["other"] <= 8 * len(SHAPES) + 64
    assert after["total"] == sum(v for k, v in after.items() if k != "total")


def test_state_bytes_sums_over_param_groups():
    p = torch.nn.Parameter(torch.randn(10, 10, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = fusedwarm.AdamW([{"params": [p]}, {"params": [q], "lr": 1e-4}], extra_bits=16,
                          state_dtype=torch.bfloat16)
    for t in (p, q):
        t.grad = torch.randn_like(t)
    opt.step()
    assert opt.state_bytes()["weights"] == 2 * 110
    assert opt.state_bytes()["states"] == 4 * 110
