"""fusedwarm inside training frameworks (``fusedwarm.trainers``): transformers, Lightning, accelerate, EMA.

Each framework's tests skip when it is not installed (``scripts/ci_extras.sh`` installs the pinned
versions). Models are tiny and built from configs (no downloads), bfloat16, on the CPU; every
reporting integration is off and data loading stays in the process. "Bit-identical" compares the
bit patterns of every parameter. The clipping guard is a process-wide change to
``torch.nn.utils``, so every test starts and ends without it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fusedwarm
from fusedwarm import reference, trainers

BF16 = torch.bfloat16
NO_WARMUP = dict(warmup="none")


@pytest.fixture(autouse=True)
def no_guard():
    trainers.guard_clipping(False)
    yield
    trainers.guard_clipping(False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(same_bits(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1)).to(BF16)


def regression_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    return x.to(BF16), x.sum(1, keepdim=True)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x).float(), y)


# ---- the clipping guard (no framework needed) --------------------------------------------------


def test_clipping_consumed_gradients_is_refused_not_silently_skipped():
    x, y = regression_data(16)
    model = mlp(0)
    opt = fusedwarm.AdamW(model.parameters(), lr=1e-2, backward_step=True, **NO_WARMUP)
    mse(model, x, y).backward()
    # The problem: torch sees no gradients and reports a norm of 0, clipping nothing.
    trainers.guard_clipping(False)
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) == 0.0

    trainers.guard_clipping()
    with pytest.raises(RuntimeError, match=r"TrainingArguments\(max_grad_norm=0\).*gradient_clip_val.*"
                                           r"max_grad_norm=<limit>, clip='lagged'"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match="clip_grad_value_"):
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
    with pytest.warns(UserWarning, match="returns nan"):
        assert math.isnan(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
    opt.step()

    # Parameters no fused optimizer updates in backward are clipped exactly as by torch.
    guarded, unguarded = mlp(1), mlp(1)
    for m in (guarded, unguarded):
        mse(m, x, y).backward()
    norm = torch.nn.utils.clip_grad_norm_(guarded.parameters(), 0.01)
    assert torch.equal(norm, torch.nn.utils.clip_grad.clip_grad_norm_(unguarded.parameters(), 0.01))
    assert all(same_bits(p.grad, q.grad) for p, q in zip(guarded.parameters(), unguarded.parameters()))


def test_grad_scaler_with_backward_step_is_refused():
    """GradScaler would unscale gradients the backward pass already applied, scaled: it must not pass silently."""
    x, y = regression_data(16)
    model = mlp(0)
    opt = fusedwarm.SGD(model.parameters(), lr=1e-2, momentum=0.9, backward_step=True)  # installs the guard
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(mse(model, x, y)).backward()
    with pytest.raises(RuntimeError, match=r"GradScaler with fusedwarm.SGD\(backward_step=True\).*loss_scale='dynamic'"):
        scaler.step(opt)
    # A disabled scaler steps as usual.
    torch.amp.GradScaler("cpu", enabled=False).step(opt)
    # Other optimizers step under the guard exactly as without it.
    weights = []
    for guarded in (True, False):
        trainers.guard_clipping(guarded)
        m = mlp(1)
        sgd = torch.optim.SGD(m.parameters(), lr=1e-2)
        s = torch.amp.GradScaler("cpu")
        s.scale(mse(m, x, y)).backward()
        s.step(sgd)
        weights.append([p.detach().clone() for p in m.parameters()])
    assert all(same_bits(a, b) for a, b in zip(*weights))


def test_clipping_gradients_kept_by_accumulate_is_allowed_and_applied():
    # accumulate() keeps the gradients for step(): clip then step equals backward_step=False.
    x, y = regression_data(16)
    trainers.guard_clipping()
    runs = []
    for backward_step in (True, False):
        model = mlp(0)
        opt = fusedwarm.AdamW(model.parameters(), lr=1e-2, backward_step=backward_step, seed=5, **NO_WARMUP)
        with opt.accumulate():
            mse(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        runs.append(model)
    assert same_params(*runs)


# ---- master-weight EMA -----------------------------------------------------------------------------


def test_master_ema_matches_the_float32_reference_ema_where_bf16_averaging_stalls():
    # Same gradient stream into fusedwarm (bfloat16 weights, 16 extra bits: the master is the
    # float32 weight) and the float32 reference; three EMAs with decay 0.99 against the
    # reference's float32 EMA: of the bfloat16 weights (AveragedModel, as for any bf16 model), of
    # the bfloat16 weights kept in float32, and of the master weights (MasterEMA).
    gen = torch.Generator().manual_seed(0)
    # Initial weights representable in bfloat16, so both runs start from the same float32 values.
    init = [torch.randn(64, 32, generator=gen).to(BF16).float(), torch.randn(32, generator=gen).to(BF16).float()]
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, **NO_WARMUP)
    fused = nn.ParameterList([nn.Parameter(t.to(BF16)) for t in init])
    ref = nn.ParameterList([nn.Parameter(t.clone()) for t in init])
    opt = fusedwarm.AdamW(fused.parameters(), extra_bits=16, state_dtype=torch.float32, seed=0, **hyper)
    ref_opt = reference.AdamW(ref.parameters(), **hyper)
    ema_fn = get_ema_multi_avg_fn(0.99)
    bf16_ema = AveragedModel(fused, multi_avg_fn=ema_fn)
    bf16_in_f32_ema = AveragedModel(nn.ParameterList([nn.Parameter(p.float()) for p in fused]),
                                    multi_avg_fn=ema_fn)
    ref_ema = AveragedModel(ref, multi_avg_fn=ema_fn)
    master_ema = trainers.MasterEMA(opt, decay=0.99)
    for step in range(301):
        if step:
            grads = [torch.randn(p.shape, generator=gen) for p in init]
            for p, q, g in zip(fused, ref, grads):
                p.grad, q.grad = g.to(BF16), g.to(BF16).float()
            opt.step()
            ref_opt.step()
            master_ema.update()
        bf16_ema.update_parameters(fused)
        bf16_in_f32_ema.update_parameters(nn.ParameterList([nn.Parameter(p.float()) for p in fused]))
        ref_ema.update_parameters(ref)

    target = torch.cat([p.detach().flatten() for p in ref_ema.module.parameters()])
    moved = float((target - torch.cat([t.flatten() for t in init])).abs().max())

    def err(params) -> float:
        return float((torch.cat([p.detach().float().flatten() for p in params]) - target).abs().max()) / moved

    master, bf16, bf16_in_f32 = err(master_ema.averages), err(bf16_ema.module.parameters()), \
        err(bf16_in_f32_ema.module.parameters())
    # Measured: master 2.5e-5, bf16 1.0 (the average never moved), bf16 in float32 0.087.
    assert master < 1e-4, master
    assert bf16 > 0.5, bf16
    assert bf16_in_f32 > 100 * master, (bf16_in_f32, master)

    evaluation = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in fused])
    master_ema.copy_to(evaluation.parameters())
    assert all(same_bits(e, a.to(BF16)) for e, a in zip(evaluation, master_ema.averages))
    with pytest.raises(ValueError, match="deep copy"):
        master_ema.copy_to(fused.parameters())
    restored = trainers.MasterEMA(opt, decay=0.5)
    restored.load_state_dict(master_ema.state_dict())
    assert restored.decay == 0.99 and all(torch.equal(a, b) for a, b in zip(restored.averages, master_ema.averages))


# ---- Hugging Face transformers.Trainer -------------------------------------------------------------


def hf_run(out_dir, *, backward_step: bool = False, trainer_clip: float = 0.0, accumulation: int = 1,
           callback: bool = True, resume: str | None = None, **opt_kw):
    """Trains a tiny bfloat16 GPT-2 for 8 optimizer steps (checkpoints every 4); returns (trainer, model).

    ``trainer_clip`` is ``TrainingArguments.max_grad_norm``; ``opt_kw`` go to ``fusedwarm.AdamW``.
    """
    transformers = pytest.importorskip("transformers")
    from fusedwarm.trainers.huggingface import FusedwarmCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).to(BF16)
    # Counting sequences (each token is the previous one plus one): learnable in a few steps.
    starts = torch.randint(0, 64, (64, 1), generator=torch.Generator().manual_seed(1))
    tokens = (starts + torch.arange(16)) % 64
    data = [{"input_ids": t, "labels": t} for t in tokens]
    opt = fusedwarm.AdamW(model.parameters(), lr=1e-2, backward_step=backward_step, seed=7, **NO_WARMUP, **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 16)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_grad_norm=trainer_clip, logging_steps=1, save_steps=4, report_to="none", use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler),
                                   callbacks=[FusedwarmCallback()] if callback else [])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def test_hf_trainer_trains_clips_and_resumes_bit_identically(tmp_path):
    full, full_model = hf_run(tmp_path / "full", trainer_clip=0.5)
    losses, norms = logged(full, "loss"), logged(full, "grad_norm")
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert max(norms) > 0.5  # the limit is active ...
    _, unclipped = hf_run(tmp_path / "unclipped", trainer_clip=0.0)
    assert not same_params(full_model, unclipped)  # ... and changes the run

    resumed, resumed_model = hf_run(tmp_path / "resumed", trainer_clip=0.5,
                                    resume=str(tmp_path / "full" / "checkpoint-4"))
    assert logged(resumed, "loss") == losses and logged(resumed, "grad_norm") == norms
    assert same_params(full_model, resumed_model)


def test_hf_trainer_with_backward_step(tmp_path):
    # The Trainer's own clipping cannot act: refused before the first update.
    with pytest.raises(ValueError, match=r"TrainingArguments\(max_grad_norm=1.0\).*max_grad_norm=0"):
        hf_run(tmp_path / "clip", backward_step=True, trainer_clip=1.0)
    # Its gradient accumulation, without the callback, runs into the double-gradient check ...
    with pytest.raises(RuntimeError, match="second gradient in one iteration"):
        hf_run(tmp_path / "plain", backward_step=True, accumulation=2, callback=False)
    # ... and with it equals backward_step=False bit for bit, fusedwarm's lagged clipping included.
    clip = dict(max_grad_norm=0.5, clip="lagged")
    stepped, stepped_model = hf_run(tmp_path / "bs", backward_step=True, accumulation=2, **clip)
    plain, plain_model = hf_run(tmp_path / "ref", backward_step=False, accumulation=2, **clip)
    assert logged(stepped, "loss") == logged(plain, "loss")
    assert same_params(stepped_model, plain_model)
    assert all(math.isnan(n) for n in logged(stepped, "grad_norm"))  # not measurable by the Trainer


# ---- PyTorch Lightning -----------------------------------------------------------------------------


def lightning_run(epochs: int, *, backward_step: bool = False, ckpt_in=None, ckpt_out=None, **trainer_kw):
    """Fits a tiny MLP with precision="bf16-true" (8 batches per epoch); returns the module."""
    pl = pytest.importorskip("lightning.pytorch")
    from fusedwarm.trainers.lightning import FusedwarmCallback

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(0).float()  # bf16-true converts it to bfloat16
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = mse(self.net, *batch)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = fusedwarm.AdamW(self.parameters(), lr=1e-2, backward_step=backward_step, seed=1, **NO_WARMUP)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    x, y = regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.float(), y), batch_size=8)
    module = Regression()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-true", max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[FusedwarmCallback()], **trainer_kw)
    trainer.fit(module, loader, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return module


def test_lightning_bf16_true_trains_clips_and_resumes_bit_identically(tmp_path):
    full = lightning_run(4, gradient_clip_val=0.5)
    assert all(p.dtype == BF16 for p in full.parameters())
    assert sum(full.losses[-8:]) < sum(full.losses[:8])
    assert not same_params(full, lightning_run(4))  # the clipping was active
    lightning_run(2, ckpt_out=tmp_path / "half.ckpt", gradient_clip_val=0.5)
    resumed = lightning_run(4, ckpt_in=tmp_path / "half.ckpt", gradient_clip_val=0.5)
    assert resumed.losses == full.losses[16:]
    assert same_params(full, resumed)


def test_lightning_with_backward_step():
    with pytest.raises(ValueError, match=r"Trainer\(gradient_clip_val=1.0\).*gradient_clip_val=None"):
        lightning_run(1, backward_step=True, gradient_clip_val=1.0)
    stepped = lightning_run(2, backward_step=True, accumulate_grad_batches=3)
    plain = lightning_run(2, backward_step=False, accumulate_grad_batches=3)
    assert stepped.losses == plain.losses
    assert same_params(stepped, plain)


@pytest.fixture
def fresh_accelerate_state():
    accelerate_state = pytest.importorskip("accelerate.state")
    yield
    accelerate_state.AcceleratorState._reset_state(True)
    accelerate_state.GradientState._reset_state()


def test_fused_optimizers_unwraps_lightning_and_accelerate_wrappers(fresh_accelerate_state):
    pl = pytest.importorskip("lightning.pytorch")
    accelerate = pytest.importorskip("accelerate.optimizer")
    model = mlp(0)
    opt = fusedwarm.AdamW(model.parameters())
    lightning_opt = pl.core.optimizer.LightningOptimizer(opt)
    assert isinstance(lightning_opt, fusedwarm.AdamW)  # Lightning subclasses the wrapped class
    accelerated = accelerate.AcceleratedOptimizer(opt, device_placement=False)
    found = trainers.fused_optimizers([lightning_opt, accelerated, None, torch.optim.SGD(model.parameters())])
    assert len(found) == 2 and all(o is opt for o in found)


# ---- accelerate ------------------------------------------------------------------------------------


def accelerate_run(micro_batches: range, *, backward_step: bool, save_to=None, load_from=None) -> nn.Module:
    """Micro-batches ``micro_batches`` of a tiny MLP under ``Accelerator(gradient_accumulation_steps=2)``."""
    accelerate = pytest.importorskip("accelerate")

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = mlp(0 if load_from is None else 99)  # a resumed run must get its weights from the checkpoint
    opt = fusedwarm.AdamW(model.parameters(), lr=1e-2, backward_step=backward_step, seed=3, max_grad_norm=0.5,
                          clip="lagged", **NO_WARMUP)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
    model, opt, scheduler = accelerator.prepare(model, opt, scheduler)
    if load_from is not None:
        accelerator.load_state(str(load_from))
    x, y = regression_data()
    for i in micro_batches:
        batch = slice(8 * i, 8 * i + 8)
        # accelerator.accumulate for backward_step=False, as accelerate documents it.
        accumulating = trainers.accumulate(accelerator, model, opt) if backward_step else accelerator.accumulate(model)
        with accumulating:
            accelerator.backward(mse(model, x[batch], y[batch]))
            opt.step()
            scheduler.step()
            opt.zero_grad()
    if save_to is not None:
        accelerator.save_state(str(save_to))
    return model


def test_accelerate_accumulation_and_save_load_state(tmp_path, fresh_accelerate_state):
    full = accelerate_run(range(8), backward_step=True)
    plain = accelerate_run(range(8), backward_step=False)
    assert same_params(full, plain)
    accelerate_run(range(4), backward_step=True, save_to=tmp_path / "state")
    resumed = accelerate_run(range(4, 8), backward_step=True, load_from=tmp_path / "state")
    assert same_params(full, resumed)

    # trainers.accumulate installed the guard: accelerate's clip_grad_norm_ refuses, not returns 0.
    accelerate = pytest.importorskip("accelerate")
    model = mlp(0)
    opt = fusedwarm.AdamW(model.parameters(), backward_step=True)
    mse(model, *regression_data(8)).backward()
    with pytest.raises(RuntimeError, match="accelerator.clip_grad_norm_"):
        accelerate.Accelerator(cpu=True).clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
