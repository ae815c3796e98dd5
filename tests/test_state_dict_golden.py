"""Golden state dicts: what ``state_dict()`` of trained optimizers holds, byte for byte.

``tests/data/state_dicts.bin`` was written by this module (``python tests/test_state_dict_golden.py``)
from the optimizer as it stood before ``fusedwarm/optim.py`` was split into modules, and rewritten once
when the loss-scale and clipping scalars moved from the top-level ``"fusedwarm"`` entry into the first
param group (checked equal to the old file with the scalars moved back), and once when param groups
gained the storage option ``state_block`` (quantized states; checked equal to the old file with that
key removed). The test trains
the same optimizers on the same random gradients and compares a canonical encoding of their state
dicts (every tensor as dtype, shape and raw bytes; every other value as itself) with the file, so a
refactoring that changes what is saved (a name, a dtype, an option, a loss-scale scalar, a bit of a
state) fails here. Regenerate the file only for a deliberate change of the state dict, and say so in
the commit.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch

import fusedwarm

GOLDEN = Path(__file__).resolve().parent / "data" / "state_dicts.bin"

# Each case: optimizer, parameter dtype, options. Together they cover extra bits 16/8/0, both state
# dtypes, float32 weights, tensor lr, schedules, update control, loss scaling, every clip mode,
# backward_step and two param groups with different options.
CASES = {
    "adamw-bf16-x16": ("AdamW", torch.bfloat16, dict(lr=1e-2, weight_decay=0.1, warmup="linear",
                                                     warmup_steps=3, loss_scale="dynamic", max_grad_norm=1.0)),
    "adamw-bf16-x0-bs": ("AdamW", torch.bfloat16, dict(lr=torch.tensor(3e-3), extra_bits=0, backward_step=True,
                                                       max_grad_norm=0.5, clip="lagged", v_init="grad",
                                                       schedule=fusedwarm.schedules.Cosine(total_steps=10))),
    "adamw-f32-rows": ("AdamW", torch.float32, dict(lr=1e-3, update_control="row", update_norm=0.05,
                                                    warmup="radam")),
    "sgd-bf16-x8": ("SGD", torch.bfloat16, dict(lr=1e-2, momentum=0.9, nesterov=True, extra_bits=8,
                                                state_dtype=torch.float32, clip="tensor", max_grad_norm=2.0)),
    "lion-f16-pam": ("Lion", torch.float16, dict(lr=1e-4, weight_decay=0.1, arithmetic="pam", loss_scale=256.0,
                                                 warmup="untuned-exp")),
}
SHAPES = ((17, 5), (5,), (3, 4, 2))
STEPS = 6


def _train(name: str, dtype: torch.dtype, options: dict) -> dict:
    gen = torch.Generator().manual_seed(1234)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    opt = getattr(fusedwarm, name)(groups, seed=7, **options)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        if opt.backward_step:
            # Gradients arriving during backward, as autograd would deliver them.
            loss = sum((p * p.grad.detach()).sum() for p in params)
            for p in params:
                p.grad = None
            loss.backward()
        opt.step()
    return opt.state_dict()


def canonical(value):
    """``value`` with every tensor replaced by (dtype, shape, raw bytes): comparable and picklable."""
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        return ("tensor", str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return ("dict", [(canonical(k), canonical(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [canonical(v) for v in value])
    return value


def golden_encoding() -> bytes:
    return pickle.dumps({case: canonical(_train(*spec)) for case, spec in CASES.items()}, protocol=4)


def test_state_dicts_match_the_golden_file():
    expected = pickle.loads(GOLDEN.read_bytes())
    got = pickle.loads(golden_encoding())
    assert got.keys() == expected.keys()
    for case in expected:
        assert got[case] == expected[case], f"{case}: state_dict() differs from {GOLDEN.name}"


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_bytes(golden_encoding())
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)", file=sys.stderr)
