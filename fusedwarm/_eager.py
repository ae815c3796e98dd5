"""Methods that always run eagerly under ``torch.compile``, without importing ``torch._dynamo`` first.

``torch.compiler.disable`` imports ``torch._dynamo`` when it is applied, which takes about a second
(more than everything else in a warm process's first step together), and so do torch.optim's own
decorated methods (``add_param_group``, ``zero_grad``, ``state_dict``, ``load_state_dict``) when
first called. fusedwarm marks its methods with :func:`eager` instead and calls torch.optim's
methods undecorated (:func:`undecorated`), so that a process that never compiles never imports it.

An ``eager`` function calls the original directly while ``torch._dynamo`` is not imported (nothing
can be compiling then); once it is, it calls ``torch._dynamo.disable(fn, reason=reason)``, made on
first need. The wrapper carries the attributes ``torch.compiler.disable`` sets on its result
(``_torchdynamo_disable``, ``_torchdynamo_disable_msg``), so dynamo stops at it, naming ``reason``
(e.g. in a ``fullgraph=True`` error), instead of tracing into it; the wrapper's own frame holds no
tensor for a method whose arguments hold none (``step``, ``zero_grad``), so dynamo does not compile
it either. Should a torch version ignore those attributes, dynamo would trace the wrapper and still
stop at the disabled original: the method runs eagerly either way, only the graph breaks differ.

Callables that receive tensors (the backward hooks in :mod:`fusedwarm.backward`) keep
``torch.compiler.disable``: dynamo would compile an ``eager`` wrapper's frame for them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


def eager(fn: Callable | None = None, *, reason: str | None = None) -> Any:
    """``torch.compiler.disable(fn, reason=reason)``, applied only once ``torch._dynamo`` is imported.

    Usable as ``@eager`` or ``@eager(reason="...")``.
    """
    if fn is None:
        return functools.partial(eager, reason=reason)
    disabled: Callable | None = None

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            dynamo = sys.modules.get("torch._dynamo")
            if dynamo is None:
                return fn(*args, **kwargs)
            disabled = dynamo.disable(fn, reason=reason)
        return disabled(*args, **kwargs)

    run._torchdynamo_disable = True  # type: ignore[attr-defined]
    run._torchdynamo_disable_msg = reason  # type: ignore[attr-defined]
    return run


def undecorated(method: Callable) -> Callable:
    """A torch.optim.Optimizer method without its ``torch._disable_dynamo`` wrapper (which imports
    ``torch._dynamo`` on its first call), for a caller that is itself :func:`eager`."""
    return getattr(method, "__wrapped__", method)
