"""LoRA files for the Sana DiT: their key formats, alphas, the check against a model, the weight formula.

Trainers write a Sana LoRA under one of these names for a layer ``M`` of the DiT (our parameter names are
diffusers', so ``M`` is e.g. ``transformer_blocks.3.attn1.to_q``):

* diffusers / PEFT: ``transformer.M.lora_A.weight`` / ``.lora_B.weight``, with or without ``base_model.model.``
  (the alpha, when not equal to the rank, is in the safetensors metadata ``lora_adapter_metadata``);
* kohya style: ``lora_unet_<M with _>`` (SimpleTuner, sd-scripts), ``lora_transformer_<M with _>`` (OneTrainer),
  ``lycoris_<M with _>``, each with ``.lora_down.weight`` / ``.lora_up.weight`` and an optional ``.alpha``;
* ComfyUI's own: ``diffusion_model.M`` with either pair of names.

Every layer with a weight matrix or kernel can carry one: self- and cross-attention projections, the Mix-FFN
convolutions (the depthwise one included), the caption projection, the timestep embedder, ``patch_embed`` and
``proj_out``. Applying one is ComfyUI's formula ``W + strength * alpha / rank * up @ down`` (:func:`lora_delta`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, read_safetensors_metadata, read_state_dict
from .config import SanaConfig
from .loader import expected_shapes

# (down, up) suffix pairs, as trainers name the two factors of one LoRA layer
PAIR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
                 (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight",
                                                             ".lora_linear_layer.up.weight"))
ALPHA_SUFFIX = ".alpha"
DORA_SUFFIXES = (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")
DOTTED_PREFIXES = ("", "transformer.", "base_model.model.", "base_model.model.transformer.", "diffusion_model.",
                   "model.diffusion_model.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights / PEFT adapter config

# what a LoRA of another family looks like (first match wins), for the refusal's wording
_OTHER_FAMILIES = (
    ("an SD 1.x/SDXL UNet", ("down_blocks", "input_blocks", "lora_unet_down_blocks", "lora_unet_input_blocks")),
    ("a Flux transformer", ("double_blocks", "single_blocks", "single_transformer_blocks")),
    ("an SD3 MMDiT", ("joint_blocks", "attn.add_q_proj", "context_block")),
    ("a text encoder", ("lora_te", "text_encoder", "te1", "te2")),
)
_BLOCK_INDEX = re.compile(r"(?:transformer_blocks|blocks)[._](\d+)[._]")


@dataclass(frozen=True)
class LoraLayer:
    """One layer's factors: ``down`` ``(rank, in, *kernel)``, ``up`` ``(out, rank, *1)``; ``alpha`` None = rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclass
class SanaLora:
    """A LoRA converted to our layer names; ``unmatched`` are the file's keys that name no layer of the DiT."""

    layers: dict[str, LoraLayer]
    unmatched: list[str] = field(default_factory=list)
    name: str = "LoRA"

    def unmatched_message(self, limit: int = 5) -> str:
        """One sentence naming the keys that were not applied ('' when all were)."""
        if not self.unmatched:
            return ""
        shown = ", ".join(self.unmatched[:limit])
        more = f" and {len(self.unmatched) - limit} more" if len(self.unmatched) > limit else ""
        return (f"{self.name}: {len(self.unmatched)} key(s) match no layer of the Sana DiT and were not applied: "
                f"{shown}{more}.")


def lora_target_layers(config: SanaConfig) -> dict[str, tuple[int, ...]]:
    """Every layer a LoRA can target (weight of 2+ dims): our name -> weight shape."""
    return {k[:-len(".weight")]: shape for k, shape in expected_shapes(config).items()
            if k.endswith(".weight") and len(shape) >= 2}


def layer_aliases(layers: Iterable[str]) -> dict[str, str]:
    """Every name a trainer gives a layer (without the factor suffix) -> our layer name.

    The one table of the formats: the engine's conversion and ComfyUI's key map are both made from it.
    """
    out: dict[str, str] = {}
    for layer in layers:
        for prefix in DOTTED_PREFIXES:
            out[prefix + layer] = layer
        for prefix in UNDERSCORE_PREFIXES:
            out[prefix + layer.replace(".", "_")] = layer
    return out


def _metadata_alphas(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float]]:
    """``(lora_alpha, alpha_pattern)`` of diffusers/PEFT metadata (keys optionally prefixed ``transformer.``)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None, {}
    try:
        data = json.loads(raw)
    except ValueError:
        return None, {}
    if not isinstance(data, dict):
        return None, {}
    data = {k.removeprefix("transformer."): v for k, v in data.items()}
    alpha = data.get("lora_alpha")
    pattern = data.get("alpha_pattern") or {}
    return (float(alpha) if isinstance(alpha, (int, float)) else None,
            {str(k): float(v) for k, v in pattern.items() if isinstance(v, (int, float))})


def _pattern_alpha(layer: str, pattern: Mapping[str, float]) -> float | None:
    for key, value in pattern.items():  # PEFT matches a pattern key as a suffix of the module name
        if re.fullmatch(rf"(.*\.)?{re.escape(key)}", layer) or re.fullmatch(key, layer):
            return value
    return None


def _guess_other_family(keys: Iterable[str]) -> str:
    keys = list(keys)
    for name, marks in _OTHER_FAMILIES:
        if any(mark in k for k in keys for mark in marks):
            return name
    return "another model"


def convert_lora(state_dict: Mapping[str, torch.Tensor], config: SanaConfig, *, name: str = "LoRA",
                 metadata: Mapping[str, str] | None = None, path: str | os.PathLike | None = None) -> SanaLora:
    """A LoRA state dict in any supported format -> :class:`SanaLora` for a model of ``config``, checked.

    Refused (``CheckpointError`` naming the file): nothing names a Sana layer (another family), blocks beyond the
    model's depth, factors whose shapes do not fit the layer (another Sana size: hidden size named). Keys that name
    nothing are kept in ``unmatched`` for the caller to report.
    """
    dora = [k for k in state_dict if k.endswith(DORA_SUFFIXES)]
    if dora:
        raise CheckpointError(path, f"{'' if path is not None else repr(name) + ' '}is a DoRA (weight-decomposed "
                                    f"LoRA, e.g. '{dora[0]}'), which this loader does not apply.",
                              "Try ComfyUI's LoraLoaderModelOnly, which reads kohya-format DoRA (.dora_scale).")
    targets = lora_target_layers(config)
    aliases = layer_aliases(targets)
    default_alpha, alpha_pattern = _metadata_alphas(metadata or {})
    factors: dict[str, dict[str, torch.Tensor]] = {}
    used: set[str] = set()
    for key in state_dict:
        for down_suffix, up_suffix in PAIR_SUFFIXES:
            for suffix, role in ((down_suffix, "down"), (up_suffix, "up")):
                if key.endswith(suffix) and key[:-len(suffix)] in aliases:
                    factors.setdefault(key[:-len(suffix)], {})[role] = state_dict[key]
                    used.add(key)
    layers: dict[str, LoraLayer] = {}
    for alias, pair in factors.items():
        if "down" not in pair or "up" not in pair:
            continue
        alpha_key = alias + ALPHA_SUFFIX
        layer = aliases[alias]
        if alpha_key in state_dict:
            alpha: float | None = float(state_dict[alpha_key].float().item())
            used.add(alpha_key)
        else:
            alpha = _pattern_alpha(layer, alpha_pattern)
            alpha = default_alpha if alpha is None else alpha
        if layer in layers:
            raise CheckpointError(path, f"has two LoRAs for the layer '{layer}' (one named '{alias}').",
                                  "The file mixes two formats; export it again from the trainer.")
        layers[layer] = LoraLayer(pair["down"], pair["up"], alpha)
    unmatched = sorted(k for k in state_dict if k not in used)
    where = "" if path is not None else f"'{name}' "  # CheckpointError puts the path first itself
    if not layers:
        indices = [int(m[1]) for k in unmatched if (m := _BLOCK_INDEX.search(k))]
        if indices and max(indices) >= config.depth and any("attn1" in k or "attn2" in k for k in unmatched):
            raise CheckpointError(path, f"{where}is a LoRA for a Sana with at least {max(indices) + 1} blocks; this "
                                        f"model has {config.depth}.", _SIZE_FIX)
        raise CheckpointError(path, f"{where}is not a LoRA for the Sana DiT: none of its {len(state_dict)} keys "
                                    f"names a Sana layer (it looks like a LoRA for {_guess_other_family(unmatched)}, "
                                    f"e.g. '{unmatched[0] if unmatched else ''}').",
                              "Choose a LoRA trained for Sana.")
    indices = [int(m[1]) for k in unmatched if (m := _BLOCK_INDEX.search(k))]
    if indices and max(indices) >= config.depth:
        raise CheckpointError(path, f"{where}is a LoRA for a Sana with at least {max(indices) + 1} blocks; this "
                                    f"model has {config.depth}.", _SIZE_FIX)
    # the attention projections are hidden x hidden in every Sana: the first one tells the LoRA's hidden size
    hidden = next((int(lora.down.shape[1]) for layer, lora in layers.items() if ".attn" in layer), None)
    if hidden is not None and hidden != config.hidden_size:
        raise CheckpointError(path, f"{where}was made for a Sana of another size (hidden size {hidden}; this model "
                                    f"has {config.hidden_size}).", _SIZE_FIX)
    for layer, lora in layers.items():
        shape = targets[layer]
        fits = (lora.up.shape[0] == shape[0] and tuple(lora.down.shape[1:]) == tuple(shape[1:])
                and lora.up.shape[1] == lora.rank and lora.down.dim() == len(shape))
        if not fits:
            raise CheckpointError(path, f"{where}does not fit this Sana model: at '{layer}' its factors are down "
                                        f"{tuple(lora.down.shape)}, up {tuple(lora.up.shape)}; the model's weight "
                                        f"is {shape}.", _SIZE_FIX)
    return SanaLora(layers, unmatched, name)


_SIZE_FIX = ("Use a LoRA trained for this Sana model (Sana 600M: hidden size 1152, 28 blocks; 1600M: 2240, 20 "
             "blocks; SANA 1.5 4.8B: 2240, 60 blocks).")


def read_lora(path: str | os.PathLike, config: SanaConfig) -> SanaLora:
    """Read a LoRA file (safetensors or a safe pickle) and convert it for a model of ``config``."""
    path = Path(path)
    metadata = read_safetensors_metadata(path) if path.suffix.lower() in (".safetensors", ".sft") else {}
    return convert_lora(read_state_dict(path), config, name=path.name, metadata=metadata, path=path)


def lora_delta(lora: LoraLayer, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """``alpha / rank * up @ down`` in the weight's shape, computed in fp32 (ComfyUI's formula)."""
    up, down = lora.up.float().flatten(1), lora.down.float().flatten(1)
    return (torch.mm(up, down) * lora.scale).reshape(shape).to(dtype)


@torch.no_grad()
def apply_lora(model: torch.nn.Module, lora: SanaLora, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Add ``strength`` x the LoRA to the model's weights in place; returns the original weights to restore."""
    modules = dict(model.named_modules())
    backup: dict[str, torch.Tensor] = {}
    for layer, factors in lora.layers.items():
        weight = modules[layer].weight
        backup[layer] = weight.detach().clone()
        merged = weight.float() + strength * lora_delta(factors, weight.shape)
        weight.copy_(merged.to(weight.dtype))
    return backup


@torch.no_grad()
def restore_weights(model: torch.nn.Module, backup: Mapping[str, torch.Tensor]) -> None:
    """Undo :func:`apply_lora` (the saved weights are copied back bit for bit)."""
    modules = dict(model.named_modules())
    for layer, weight in backup.items():
        modules[layer].weight.copy_(weight)


def to_comfy_lora(lora: SanaLora, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """The LoRA in ComfyUI's own naming (``<prefix><layer>.lora_up/down.weight`` + ``.alpha``), so ComfyUI's
    loader applies it with its patch mechanism; alphas from metadata become explicit ``.alpha`` tensors."""
    out: dict[str, torch.Tensor] = {}
    for layer, factors in lora.layers.items():
        base = prefix + layer
        out[base + ".lora_down.weight"] = factors.down
        out[base + ".lora_up.weight"] = factors.up
        out[base + ALPHA_SUFFIX] = torch.tensor(float(factors.rank if factors.alpha is None else factors.alpha))
    return out
