"""Turning a checked state dict into a model: built on the meta device, weights assigned, never copied twice."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import chain
from typing import TypeVar

import torch

from ..cast_ops import to_storage
from ..progress import ProgressFn, report
from .dtype import stored_dtype
from .errors import CheckpointError, short_list
from .keys import check_keys
from .pages import checkpoint_mappings, release_pages

M = TypeVar("M", bound=torch.nn.Module)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device but real buffers.

    For models that compute non-persistent buffers in their constructor (Gemma-2's rotary table and
    embedding scale), which a checkpoint does not hold. Uses torch's parameter-registration hook and
    acts only on the calling thread, so a module built elsewhere meanwhile is unaffected.
    """
    builder = threading.get_ident()

    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> torch.nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != builder:
            return None
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def check_kinds(state_dict: Mapping[str, torch.Tensor], layout: Mapping[str, torch.Tensor], *,
                path: str | os.PathLike | None, family: str) -> None:
    """Weights the model holds as floating-point numbers must be stored as such (not relabelled as integers).

    Caught here, it is one sentence; left to ``load_state_dict`` it is a paragraph per parameter.
    """
    wrong = [f"{k} ({state_dict[k].dtype})".replace("torch.", "") for k, v in layout.items()
             if k in state_dict and v.is_floating_point() != state_dict[k].is_floating_point()]
    if wrong:
        raise CheckpointError(path, f"stores {len(wrong)} tensor(s) as the wrong kind of number for the {family} "
                                    f"layout (integers where it has floating-point weights, or the reverse): "
                                    f"{short_list(wrong, 3)}.",
                              "The file is damaged or was changed after it was saved: download it again.")


def _layer_parameters(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the weights and biases of the model's ``Linear`` and ``Conv2d`` layers."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            for name, _ in module.named_parameters(recurse=False)}


def load_model(
    build: Callable[[], M],
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: str | os.PathLike | None,
    family: str,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    real_buffers: bool = False,
    storage_dtype: torch.dtype | None = None,
    progress: ProgressFn | None = None,
) -> M:
    """The one way every family turns a converted state dict into a model.

    ``build()`` runs on the meta device, so nothing is allocated or initialised twice
    (``real_buffers=True``: only parameters go to meta, see :func:`parameters_on_meta`). The state
    dict is then checked strictly against the model (:func:`check_keys`, with the family's documented
    ``ignore`` patterns) and its tensors are assigned, cast to ``dtype`` (``None``: the stored dtype,
    :func:`stored_dtype`) and moved to ``device``. Returns the model in eval mode without gradients.

    ``storage_dtype`` (e.g. fp8) keeps the weights and biases of every ``Linear``/``Conv2d`` in that dtype
    and the rest (norms, tables, embeddings) in ``dtype``: the model must then be built with layers that
    cast their weights to the input's dtype when they run (:mod:`uniba.cast_ops`, ComfyUI's ops).
    ``progress(done, total)`` after each tensor read (a multi-GB file on a slow disk takes a while); raising
    from it cancels safely: nothing is kept, the model is dropped.
    """
    if real_buffers:
        with parameters_on_meta():
            model = build()
    else:
        with torch.device("meta"):
            model = build()
    layout = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in layout.items()}
    check_keys(state_dict, expected, path=path, family=family, ignore=ignore)
    check_kinds(state_dict, layout, path=path, family=family)
    dtype = dtype or stored_dtype(state_dict) or torch.float32
    in_storage = _layer_parameters(model) if storage_dtype not in (None, dtype) else set()
    weights = {}
    mappings = checkpoint_mappings()
    wanted = [key for key in state_dict if key in expected]
    for done, key in enumerate(wanted, 1):  # one tensor at a time: never a second full copy of the model
        value = state_dict[key]
        if key in in_storage:
            converted = to_storage(value.to(device), storage_dtype)
        else:
            converted = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        if converted is not value:
            release_pages([value], mappings)
        weights[key] = converted
        report(progress, done, len(wanted))
    model.load_state_dict(weights, strict=True, assign=True)
    unset = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unset:  # a non-persistent buffer built on meta: the model needs real_buffers=True
        raise RuntimeError(f"{family}: {short_list(unset)} were neither in the checkpoint nor computed; "
                           "build this model with real_buffers=True.")
    return model.eval().requires_grad_(False)
