"""Read Sana DiT checkpoints (original ``.pth``/safetensors or diffusers) into :class:`SanaDiT`.

Accepted: the original releases (``state_dict`` wrapper, fp16/bf16/fp32, optional
``model.diffusion_model.`` prefix) and diffusers-format safetensors (a single file, or a
``transformer/`` folder with a sharded index and ``config.json``). Loading is strict: every key
must map with the right shape; only the documented non-weights (:data:`keys.ORIGINAL_IGNORE`) are
dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cast_ops import CastOnUseOps
from ..checkpoint import (
    CheckpointError,
    load_model,
    read_json,
    read_safetensors_metadata,
    read_state_dict,
    stored_dtype,
    wrong_family_error,
)
from ..metadata import metadata_object
from ..progress import ProgressFn
from . import keys as sana_keys
from .config import SHIFT_4K, SanaConfig, config_from_diffusers, hints_from_name, infer_config
from .model import SanaDiT, sincos_position_embedding

FAMILY = "Sana DiT"
METADATA_KEY = "sana_config"


@dataclass
class SanaCheckpoint:
    """A checkpoint converted to our keys, with the config inferred for it."""

    state_dict: dict[str, torch.Tensor]
    config: SanaConfig
    source_format: str
    stored_dtype: torch.dtype
    path: str | None = None


def find_sidecar(path: Path, accept: Callable[[dict[str, Any]], bool]) -> tuple[Path, dict[str, Any]] | None:
    """The diffusers ``config.json`` in the model folder or beside the file that ``accept`` recognises, if any.

    A file that is not valid JSON (or is not this model's config) is passed over: the weights decide.
    """
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "config.json", path.with_suffix(".json") if path.is_file() else None):
        if candidate is not None and candidate.is_file():
            try:
                data = read_json(candidate)
            except CheckpointError:
                continue
            if isinstance(data, dict) and accept(data):
                return candidate, data
    return None


def _is_sana_transformer(data: dict[str, Any]) -> bool:
    return (data.get("_class_name", "SanaTransformer2DModel") == "SanaTransformer2DModel"
            and ("num_layers" in data or "attention_head_dim" in data))


def _sidecar_config(path: Path) -> dict[str, Any]:
    """A diffusers ``config.json`` in the model folder or beside the file (only a Sana transformer's)."""
    found = find_sidecar(path, _is_sana_transformer)
    if found is None:
        return {}
    candidate, data = found
    try:
        config = config_from_diffusers(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(candidate, f"has a value of the wrong type ({exc}).",
                              "Use the model's original diffusers config.json.") from None
    folder = path if path.is_dir() else path.parent
    config.update(_scheduler_shift(folder.parent / "scheduler" / "scheduler_config.json"))
    return config


def _scheduler_shift(path: Path) -> dict[str, Any]:
    """The release's flow shift from a diffusers pipeline's ``scheduler/scheduler_config.json``."""
    if not path.is_file():  # also skips a FIFO or device of that name, which read_text would block on
        return {}
    try:
        shift = read_json(path).get("flow_shift")
    except (CheckpointError, AttributeError):
        return {}
    return {"flow_shift": float(shift)} if shift else {}


def _metadata_config(path: Path) -> dict[str, Any]:
    if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
        text = read_safetensors_metadata(path).get(METADATA_KEY)
        if text:
            return metadata_object(text, path, METADATA_KEY)
    return {}


def pe_from_buffer(pos_embed: Any, hidden_size: int) -> dict[str, Any]:
    """Read use_pe/base size/interpolation from an original checkpoint's ``pos_embed`` buffer.

    The buffer is all zeros in NoPE releases and holds the training-size sincos table otherwise;
    the interpolation is found by comparing with the tables of the released values.
    """
    tokens = int(pos_embed.shape[-2])
    base = math.isqrt(tokens)
    if base * base != tokens:
        return {}
    table = pos_embed.detach().reshape(tokens, -1).float()
    if not bool(table.abs().amax() > 0):
        return {"use_pe": False, "pe_base_size": base}
    best, best_err = 1.0, float("inf")
    for interp in (1.0, 2.0, 0.5, 4.0, base / 64, base / 32):
        ref = sincos_position_embedding(hidden_size, base, base, base, interp, torch.device("cpu"), torch.float32)
        err = float((ref - table).abs().amax())
        if err < best_err:
            best, best_err = interp, err
    hints = {"use_pe": True, "pe_base_size": base, "pe_interpolation": float(best)}
    if base >= 128:
        hints["flow_shift"] = SHIFT_4K
    return hints


def read_sana_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor],
                         overrides: Mapping[str, Any] | None = None) -> SanaCheckpoint:
    """Read and convert a checkpoint without building the model (the dtype can be chosen from it first).

    ``source`` may be a file, a diffusers ``transformer/`` folder or a whole pipeline folder
    (:func:`pipeline_parts`); regular Sana and Sana-Sprint alike (``config.is_sprint``).
    """
    path = None if isinstance(source, Mapping) else Path(source)
    if path is not None and path.is_dir() and (path / "model_index.json").is_file():
        path = pipeline_parts(path).transformer
    raw = dict(source) if path is None else read_state_dict(path)
    stripped = sana_keys.strip_prefix(raw)
    fmt = sana_keys.detect_format(stripped)
    if fmt is None:
        raise wrong_family_error(path, f"{FAMILY} (original or diffusers format)", raw.keys(),
                                 "Choose a Sana transformer file (e.g. Sana_1600M_1024px_BF16.pth or a diffusers "
                                 "transformer/diffusion_pytorch_model.safetensors) in models/diffusion_models/.")
    hints: dict[str, Any] = {}
    if path is not None:
        hints.update(hints_from_name(path.name if path.is_file() else str(path)))
        hints.update(_sidecar_config(path))
        hints.update(_metadata_config(path))
    if fmt == "original" and "pos_embed" in stripped:
        hidden = int(stripped["x_embedder.proj.weight"].shape[0]) if "x_embedder.proj.weight" in stripped else 0
        if hidden and stripped["pos_embed"].shape[-1] == hidden:
            hints.update(pe_from_buffer(stripped["pos_embed"], hidden))
    hints.update(overrides or {})
    converted = sana_keys.original_to_ours(stripped) if fmt == "original" else stripped
    config = infer_config(converted, hints, path)
    return SanaCheckpoint(converted, config, fmt, stored_dtype(converted) or torch.float32,
                          None if path is None else str(path))


@dataclass(frozen=True)
class PipelineParts:
    """The subfolders of a diffusers pipeline folder (``<name>_diffusers/``) that our loaders read."""

    root: Path
    pipeline_class: str
    transformer: Path
    text_encoder: Path
    vae: Path

    @property
    def is_sprint(self) -> bool:
        return self.pipeline_class.startswith("SanaSprint")


# What each part must hold to be usable, in the order a user would fix them.
_PARTS = (("transformer", "config.json"), ("text_encoder", "config.json"), ("tokenizer", None), ("vae", "config.json"))


def pipeline_parts(folder: str | os.PathLike) -> PipelineParts:
    """Check a diffusers Sana pipeline folder (``model_index.json`` + subfolders) before anything is read.

    Regular (``SanaPipeline``) and Sprint (``SanaSprintPipeline``) folders have the same parts; a
    missing part is refused naming it, so a half-finished download fails before gigabytes are read.
    """
    root = Path(folder)
    index = root / "model_index.json"
    data = read_json(index, "Download the whole <name>_diffusers folder again.")
    pipeline_class = str(data.get("_class_name", "")) if isinstance(data, dict) else ""
    if not pipeline_class.startswith("Sana"):
        raise CheckpointError(root, f"is a '{pipeline_class or 'unknown'}' pipeline, not a Sana or Sana-Sprint one.",
                              "Choose a Sana_*_diffusers or Sana_Sprint_*_diffusers folder.")
    for part, required in _PARTS:
        if not (root / part).is_dir() or (required and not (root / part / required).is_file()):
            raise CheckpointError(root, f"has no complete '{part}' subfolder"
                                        f"{f' (with {required})' if required else ''}.",
                                  f"Download the '{part}' folder of the pipeline into {root}.")
    return PipelineParts(root, pipeline_class, root / "transformer", root / "text_encoder", root / "vae")


def expected_shapes(config: SanaConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the model for ``config``, without allocating it."""
    with torch.device("meta"):
        model = SanaDiT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_sana(checkpoint: SanaCheckpoint, dtype: torch.dtype | None = None, *, device: str | torch.device = "cpu",
               operations: Any = None, storage_dtype: torch.dtype | None = None,
               progress: ProgressFn | None = None) -> SanaDiT:
    """The model of a read checkpoint: built on meta, keys checked strictly, weights assigned.

    ``dtype`` is the compute dtype (None keeps the checkpoint's). ``storage_dtype`` (fp8) keeps the layers'
    weights smaller and casts each to ``dtype`` when it runs (SANA-1.5 4.8B on a 12 GB card); the layers are
    then :mod:`uniba.cast_ops` unless the host brings its own casting ones. ``operations`` are the host's
    layer classes (ComfyUI's ops); the default is ``torch.nn``.
    """
    dtype = dtype or checkpoint.stored_dtype
    casting = storage_dtype is not None and storage_dtype != dtype
    ops = operations or (CastOnUseOps if casting else None)
    model = load_model(lambda: SanaDiT(checkpoint.config, operations=ops), checkpoint.state_dict,
                       path=checkpoint.path, family=FAMILY, dtype=dtype, device=device,
                       storage_dtype=storage_dtype if casting else None, progress=progress)
    if casting:
        model.compute_dtype = dtype
    return model


def load_sana(source: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, *,
              device: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None,
              storage_dtype: torch.dtype | None = None) -> SanaDiT:
    """Load a Sana DiT from a file, a diffusers folder or a state dict (either key format).

    The one load path: :func:`read_sana_checkpoint` then :func:`build_sana`, which the ComfyUI
    loader node also calls (it only adds ComfyUI's layer classes and wraps the result).
    ``dtype`` None keeps the checkpoint's dtype. ``overrides`` sets config fields the weights cannot
    tell (``use_pe``, ``pe_base_size``, ``pe_interpolation``, ``cross_heads``, ``flow_shift``).
    ``storage_dtype`` (fp8) stores the layers' weights smaller, see :func:`build_sana`.
    """
    return build_sana(read_sana_checkpoint(source, overrides), dtype, device=device, storage_dtype=storage_dtype)
