"""Argument checks of the fused optimizers, and their error messages, in one place.

This module owns what counts as a valid option, hyperparameter, parameter and gradient, and says
so in messages that name what was expected and what was given. It only inspects values and
raises; it never changes an optimizer, a parameter or a state (a failed check leaves everything
as it was), and it knows nothing about kernels or the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _sharding, schedules

EXTRA_BITS = (0, 8, 16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
QUANTIZED_STATE_DTYPES = {"int8": 8, "int4": 4}  # block-quantized states: bits per element
MIN_STATE_BLOCK, MAX_STATE_BLOCK = 32, 2048      # csrc/include/fusedwarm/quant.cuh
ARITHMETICS = ("ieee", "pam")
UPDATE_CONTROLS = (None, "tensor", "row", "rotational")
CLIP_MODES = ("global", "tensor", "lagged", "lagged-tensor")
WARMUPS = ("untuned", "untuned-exp", "linear", "radam", "none")
V_INITS = ("zero", "grad")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_nonneg(name: str, value: Any) -> None:
    """``value`` is a number >= 0, or a one-element floating-point tensor holding one."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating-point tensor, got {value!r}")
        # As torch.optim does, the value is checked once here (a sync for a GPU tensor at
        # construction only); step() itself never reads it on the host.
        if not bool(value >= 0):
            raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")
        return
    if not _is_number(value) or math.isnan(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")


def check_beta(name: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected 0 <= {name} < 1)")


def check_lr_betas(group: dict[str, Any]) -> None:
    check_nonneg("lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair)")
    check_beta("beta1", betas[0])
    check_beta("beta2", betas[1])


def check_storage(extra_bits: Any, state_dtype: Any, seed: Any, state_block: Any = None) -> None:
    """The options that decide how weights and states are stored, and the random stream's key."""
    if type(extra_bits) is not int or extra_bits not in EXTRA_BITS:
        raise ValueError(f"Invalid extra_bits: {extra_bits!r} (expected one of {EXTRA_BITS})")
    quantized = isinstance(state_dtype, str) and state_dtype in QUANTIZED_STATE_DTYPES
    if state_dtype is not None and not quantized and state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected None, torch.float32, torch.bfloat16, "
                         f"'int8' or 'int4')")
    if state_block is not None:
        if not quantized:
            raise ValueError(f"state_block={state_block!r} is only used with quantized states (state_dtype='int8' or "
                             f"'int4'), not state_dtype={state_dtype!r}")
        if (type(state_block) is not int or not MIN_STATE_BLOCK <= state_block <= MAX_STATE_BLOCK
                or state_block & (state_block - 1)):
            raise ValueError(f"Invalid state_block: {state_block!r} (expected a power of two from {MIN_STATE_BLOCK} "
                             f"to {MAX_STATE_BLOCK})")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"Invalid seed: {seed!r} (expected an int in [0, 2**63))")


def check_driver(backward_step: Any, bucket_cap_mb: Any, max_grad_norm: Any, clip: Any, loss_scale: Any) -> None:
    """The optimizer-wide options: step in backward, clipping and loss scaling."""
    if not isinstance(backward_step, bool):
        raise ValueError(f"Invalid backward_step: {backward_step!r} (expected True or False)")
    if not _is_number(bucket_cap_mb) or not bucket_cap_mb > 0:
        raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb!r} (expected a number > 0)")
    if max_grad_norm is not None and (not _is_number(max_grad_norm) or not 0 < max_grad_norm < math.inf):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected None or a finite number > 0)")
    if clip not in CLIP_MODES:
        raise ValueError(f"Invalid clip: {clip!r} (expected one of {CLIP_MODES})")
    if backward_step and max_grad_norm is not None and clip == "global":
        raise ValueError(
            "clip='global' (exact global-norm clipping) needs every gradient before any update, but "
            "backward_step=True updates each parameter as soon as its gradient is ready. Options: "
            "clip='tensor' clips each tensor by its own norm (exact, local); clip='lagged' scales the "
            "gradients by the coefficient of the previous iteration's global norm (summed on the device "
            "during backward, no host sync); clip='lagged-tensor' also holds each tensor to its own "
            "limit and bounds the first iteration; or backward_step=False for exact global clipping"
        )
    if loss_scale is not None and loss_scale != "dynamic" and (
            not _is_number(loss_scale) or not 0 < loss_scale < math.inf):
        raise ValueError(f"Invalid loss_scale: {loss_scale!r} (expected None, 'dynamic' or a finite number > 0)")


def check_update_control(group: dict[str, Any]) -> None:
    control, bound = group.get("update_control"), group.get("update_norm")
    if control not in UPDATE_CONTROLS:
        raise ValueError(f"Invalid update_control: {control!r} (expected one of {UPDATE_CONTROLS})")
    if control is None or control == "rotational":
        if bound is not None:
            raise ValueError(f"update_norm={bound!r} needs update_control='tensor' or 'row'")
        if control == "rotational" and not group.get("weight_decay", 0) > 0:
            raise ValueError("update_control='rotational' needs weight_decay > 0: it sets the equilibrium angular "
                             "update")
        return
    if not _is_number(bound) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"Invalid update_norm: {bound!r} (update_control={control!r} needs a finite number > 0)")


def check_arithmetic(arithmetic: Any) -> None:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"Invalid arithmetic: {arithmetic!r} (expected one of {ARITHMETICS})")


def check_warmup(opt: str, allowed: tuple[str, ...], group: dict[str, Any]) -> None:
    """The warmup options of ``group`` for optimizer ``opt``, which supports the warmups ``allowed``."""
    warmup, steps, start = group["warmup"], group["warmup_steps"], group["warmup_start"]
    if warmup not in WARMUPS:
        raise ValueError(f"Invalid warmup: {warmup!r} (expected one of {WARMUPS})")
    if warmup not in allowed:
        raise ValueError(f"{opt} does not support warmup={warmup!r} (supported: {allowed})")
    if warmup == "linear":
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"Invalid warmup_steps: {steps!r} (warmup='linear' needs an int > 0)")
    elif steps is not None:
        raise ValueError(f"warmup_steps={steps!r} is only used with warmup='linear', not warmup={warmup!r}")
    if not _is_number(start) or not 0.0 <= start <= 1.0:
        raise ValueError(f"Invalid warmup_start: {start!r} (expected a number in [0, 1])")
    if start != 0.0 and warmup != "linear":
        raise ValueError(f"warmup_start={start!r} is only used with warmup='linear', not warmup={warmup!r}")
    schedules.from_dict(group["schedule"])


def check_group(opt: str, allowed_warmups: tuple[str, ...], check_hyper: Callable[[dict[str, Any]], None],
                group: dict[str, Any]) -> None:
    """Every option of a param group merged with the defaults; ``check_hyper`` checks the rule's own."""
    check_storage(group.get("extra_bits", 16), group.get("state_dtype"), group.get("seed"), group.get("state_block"))
    check_arithmetic(group.get("arithmetic", "ieee"))
    check_update_control(group)
    check_hyper(group)
    check_warmup(opt, allowed_warmups, group)


# torch.optim options that fusedwarm does not implement, and why; they must be off (False/None).
UNSUPPORTED_TORCH_OPTIONS = {
    "amsgrad": "AMSGrad's running maximum of the second moment is not implemented",
    "capturable": "CUDA-graph capture of the fused step is not validated on a GPU yet",
    "differentiable": "the fused step updates in place through a custom operator and is not differentiable",
}
# torch.optim's choice of implementation: fusedwarm always runs its own fused multi-tensor kernel.
IMPLEMENTATION_OPTIONS = ("foreach", "fused")
# Every torch.optim group key above, plus Adam's weight-decay flavour: none is kept in a fusedwarm group.
TORCH_GROUP_KEYS = (*UNSUPPORTED_TORCH_OPTIONS, *IMPLEMENTATION_OPTIONS, "decoupled_weight_decay")


def check_torch_options(opt: str, options: dict[str, Any], loading: bool = False) -> None:
    """torch.optim options given to a constructor, or (``loading``) found in a loaded param group.

    Options that would change the update (``amsgrad``, ``capturable``, ``differentiable``, Adam's
    L2 weight decay) must be off. ``foreach``/``fused`` select torch's implementation: ``None`` or
    ``True`` are what fusedwarm does anyway; ``False`` at construction asks for an implementation
    fusedwarm does not have, while in a loaded checkpoint it only records how torch ran.
    """
    where = "the loaded state dict has" if loading else "got"
    for name, why in UNSUPPORTED_TORCH_OPTIONS.items():
        if options.get(name):
            raise ValueError(f"{opt}: {where} {name}={options[name]!r}, which fusedwarm does not support: {why}. "
                             f"Use {name}=False")
    if options.get("decoupled_weight_decay") is False and options.get("weight_decay", 0) != 0:
        raise ValueError(f"{opt}: {where} decoupled_weight_decay=False with weight_decay="
                         f"{options['weight_decay']!r} (torch.optim.Adam's L2 penalty); fusedwarm.AdamW's weight "
                         f"decay is decoupled, as torch.optim.AdamW's")
    if not loading:
        for name in IMPLEMENTATION_OPTIONS:
            if options.get(name) is False:
                raise ValueError(f"{opt}: {name}=False asks for torch's non-fused implementation; fusedwarm runs "
                                 f"only its fused multi-tensor kernel (pass {name}=None or True)")


def param_problem(p: Tensor) -> str | None:
    """Why ``p`` cannot be a fused optimizer's parameter, or None if it can."""
    if p.dtype not in PARAM_DTYPES:
        return f"has dtype {p.dtype}; fusedwarm updates float32, bfloat16 and float16 parameters only"
    if p.layout != torch.strided:
        return f"has layout {p.layout}; only dense (strided) parameters are supported"
    if _sharding.is_sharded(p):
        return _sharding.problem(p)
    return None


def check_grad(what: Callable[[], str], p: Tensor, g: Tensor) -> None:
    """``g`` is a dense real gradient of ``p``'s dtype, shape and device; ``what()`` names ``p``."""
    if g.dtype == p.dtype and g.shape == p.shape and g.device == p.device and g.layout == torch.strided:
        return
    if g.layout != torch.strided:
        raise RuntimeError(f"{what()} has a sparse gradient ({g.layout}); fusedwarm supports dense gradients only")
    if g.is_complex():
        raise RuntimeError(f"{what()} has a complex gradient ({g.dtype}); fusedwarm supports real gradients only")
    raise RuntimeError(
        f"{what()} has a gradient of dtype {g.dtype}, shape {tuple(g.shape)} on {g.device}; "
        f"expected dtype {p.dtype}, shape {tuple(p.shape)} on {p.device}"
    )
