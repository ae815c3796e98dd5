"""End to end: a small bfloat16 model trained with fusedwarm ends where the float32 reference does.

A byte-level MLP language model (the previous CONTEXT bytes predict the next one) is trained on
the source of Python's json.decoder, from the same initialization and batch order, with each
fused optimizer in every mode (16, 8 or 0 extra bits, float32 or bfloat16 states) and with the
matching reference optimizer (float32 master and states). The final loss, averaged over the last
LAST steps, must be within TRAIN_LOSS_RTOL of the reference's. A control shows the criterion has
teeth: plain bfloat16 training (torch.optim, round-to-nearest weights, no master) misses it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json.decoder
import math
from pathlib import Path

import pytest
import torch

import fusedwarm
from fusedwarm import reference
from helpers import OPTIMIZERS, TRAIN_LOSS_RTOL

CONTEXT, EMBED, HIDDEN, BATCH, STEPS, LAST = 8, 16, 128, 64, 300, 20

# The 300 steps are shorter than AdamW's default untuned warmup (2000 steps for beta2 = 0.999), so
# the fused and reference runs take no warmup: the control below is then like for like.
NO_WARMUP = dict(warmup="none")
TRAIN_HYPER = {
    "AdamW": dict(lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    "SGD": dict(lr=0.1, momentum=0.9),
    "Lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
}


@functools.cache
def corpus() -> torch.Tensor:
    return torch.tensor(list(Path(inspect.getsourcefile(json.decoder)).read_bytes()), dtype=torch.long)


@functools.cache
def initial_model_and_batches() -> tuple[torch.nn.Module, torch.Tensor]:
    """The bfloat16 model every run starts from, and the start offsets of every batch."""
    torch.manual_seed(2024)
    model = torch.nn.Sequential(
        torch.nn.Embedding(256, EMBED),
        torch.nn.Flatten(),
        torch.nn.Linear(CONTEXT * EMBED, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, 256),
    ).to(torch.bfloat16)
    starts = torch.randint(0, len(corpus()) - CONTEXT, (STEPS, BATCH))
    return model, starts


def train(make_optimizer) -> float:
    """Trains a copy of the initial model; returns the mean training loss of the last LAST steps."""
    model0, starts = initial_model_and_batches()
    model = copy.deepcopy(model0)
    opt = make_optimizer(model.parameters())
    window = torch.arange(CONTEXT + 1)
    losses = []
    for step in range(STEPS):
        batch = corpus()[starts[step, :, None] + window]
        logits = model(batch[:, :CONTEXT])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch[:, CONTEXT])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    return sum(losses[-LAST:]) / LAST


@functools.cache
def reference_loss(name: str) -> float:
    loss = train(lambda params: getattr(reference, name)(params, **TRAIN_HYPER[name], **NO_WARMUP))
    assert loss < 0.6 * math.log(256), f"the reference {name} did not train (final loss {loss:.3f})"
    return loss


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["sf32", "sbf16"])
@pytest.mark.parametrize("extra_bits", [16, 8, 0], ids=["x16", "x8", "x0"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_training_matches_reference(name, extra_bits, state_dtype):
    loss = train(lambda params: getattr(fusedwarm, name)(params, extra_bits=extra_bits, state_dtype=state_dtype,
                                                         seed=17, **TRAIN_HYPER[name], **NO_WARMUP))
    ref = reference_loss(name)
    assert abs(loss / ref - 1) <= TRAIN_LOSS_RTOL, f"final loss {loss:.4f} vs reference {ref:.4f}"


def test_round_to_nearest_bf16_training_misses_reference():
    """Control: torch.optim.AdamW on the bfloat16 weights themselves loses the small updates."""
    loss = train(lambda params: torch.optim.AdamW(params, **TRAIN_HYPER["AdamW"]))
    ref = reference_loss("AdamW")
    assert loss / ref - 1 > TRAIN_LOSS_RTOL, f"plain bf16 loss {loss:.4f} vs reference {ref:.4f}"
