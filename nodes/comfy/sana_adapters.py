"""Sana LoRA, ControlNet and PAG inside ComfyUI, each through ComfyUI's own mechanism.

* LoRA: ComfyUI's patcher (``add_patches``, strength, stacking, unpatching). Its key map
  (``comfy.lora.model_lora_keys_unet``) is a fixed chain of ``isinstance`` checks over core model classes with no
  way to register another one; for any model it maps ``diffusion_model.<param>`` and ``lora_unet_<param with _>``,
  which already covers our parameter names. The diffusers/PEFT (``transformer.``, ``base_model.model.``) and
  OneTrainer (``lora_transformer_``) names need an entry the host cannot be told about, so
  :func:`install_lora_key_map` wraps that one function, once: for a model whose ``diffusion_model`` is our
  :class:`SanaDiT` it adds the aliases of :func:`uniba.sana.lora.layer_aliases`; for every other model it returns
  exactly what ComfyUI returned. The checked loader (:func:`apply_lora`) does not need the wrap: it converts the
  file to ComfyUI's own naming first.
* ControlNet: a core ``comfy.controlnet.ControlNet`` whose control model is our :class:`SanaControlNet`, so the
  stock Apply ControlNet node does the rest (control image resized to the latent with ComfyUI's
  ``common_upscale``, encoded by the VAE given to it, scaled by the latent format; strength, start/end percent,
  chaining); the DiT adds the residuals it hands over as ``control``.
* PAG: a post-CFG function on a clone of the MODEL, like core's PerturbedAttentionGuidance, whose extra pass asks the
  DiT for identity self-attention in the chosen blocks through ``transformer_options``.
"""

from __future__ import annotations

from typing import Any

import torch

from uniba.sana.controlnet import SanaControlNet, load_controlnet
from uniba.sana.lora import SanaLora, layer_aliases, lora_target_layers, read_lora, to_comfy_lora
from uniba.sana.model import SanaDiT
from uniba.sana.pag import PERTURBED_BLOCKS_OPTION, parse_layers, scale_at

from . import host
from . import sana as comfy_sana

try:  # pragma: no cover - exercised in the integration tier
    import comfy.controlnet
    import comfy.lora
    import comfy.model_management
    import comfy.ops
    import comfy.samplers
    import comfy.sd
except Exception:  # noqa: BLE001 - headless: the functions below say what needs ComfyUI
    pass

_MARK = "_uniba_sana_aliases"


def sana_dit(model: Any, input_name: str = "model") -> SanaDiT:
    """The engine DiT inside a MODEL (patcher or BaseModel), or one sentence saying what to connect."""
    inner = getattr(model, "model", model)
    dit = getattr(inner, "diffusion_model", inner)
    if not isinstance(dit, SanaDiT):
        raise ValueError(f"{input_name}: this node needs a Sana MODEL; connect the output of 'Sana DiT Loader' "
                         f"(got {type(dit).__name__}).")
    return dit


# --------------------------------------------------------------------------- LoRA

def sana_lora_key_map(base_model: Any) -> dict[str, str]:
    """Every trainer's name of every Sana layer -> ComfyUI's weight key (``diffusion_model.<layer>.weight``)."""
    layers = lora_target_layers(sana_dit(base_model).config)
    return {alias: f"diffusion_model.{layer}.weight" for alias, layer in layer_aliases(layers).items()}


def install_lora_key_map() -> bool:
    """Make ComfyUI's LoRA key map know Sana's trainer names (see the module docstring); idempotent."""
    if not host.IN_COMFYUI:
        return False
    try:
        original = comfy.lora.model_lora_keys_unet
    except (NameError, AttributeError):  # a host without that function: only the checked loader works
        return False
    if getattr(original, _MARK, False):
        return True

    def model_lora_keys_unet(model: Any, key_map: dict | None = None) -> dict:
        key_map = original(model) if key_map is None else original(model, key_map)
        if isinstance(getattr(model, "diffusion_model", None), SanaDiT):
            for alias, target in sana_lora_key_map(model).items():
                key_map.setdefault(alias, target)
        return key_map

    setattr(model_lora_keys_unet, _MARK, True)
    model_lora_keys_unet.__wrapped__ = original  # type: ignore[attr-defined]
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet
    return True


def read_checked_lora(model: Any, path: str) -> SanaLora:
    """Read a LoRA file for this MODEL: refused when made for another family or Sana size (file named)."""
    return read_lora(path, sana_dit(model).config)


def apply_lora(model: Any, lora: SanaLora, strength: float, node_id: str | None = None) -> Any:
    """A clone of the MODEL with the LoRA as ComfyUI patches (strength, stacking and unpatching are ComfyUI's)."""
    host.require_comfyui("Applying a LoRA to the MODEL")
    if lora.unmatched:
        host.warn(lora.unmatched_message(), node_id)
    patched, _ = comfy.sd.load_lora_for_models(model, None, to_comfy_lora(lora), strength, 0.0)
    return patched


# --------------------------------------------------------------------------- ControlNet

class ComfyControlModel(SanaControlNet):
    """The engine ControlNet under the call ComfyUI's ``ControlNet.get_control`` makes."""

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, **_: Any) -> dict[str, list[torch.Tensor]]:
        return {"output": super().forward(x, hint, timesteps, context, context_mask)}


def load_control_net(path: str, dtype: torch.dtype, wiring: str = "diffusers") -> Any:
    """A CONTROL_NET (core ``ControlNet``) around a Sana ControlNet file, for the stock Apply ControlNet node."""
    host.require_comfyui("A Sana CONTROL_NET")
    device = host.torch_device()
    manual_cast = comfy.model_management.unet_manual_cast(dtype, device, [torch.bfloat16, torch.float16,
                                                                          torch.float32])
    model = load_controlnet(path, dtype, operations=comfy.ops.pick_operations(dtype, manual_cast),
                            wiring=wiring, model_class=ComfyControlModel)
    model.compute_dtype = manual_cast
    return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=comfy_sana.SanaLatentFormat(),
                                       load_device=device, manual_cast_dtype=manual_cast,
                                       extra_conds=["context_mask"])


# --------------------------------------------------------------------------- PAG

def pag_model(model: Any, scale: float, applied_layers: str, adaptive_scale: float = 0.0) -> Any:
    """A clone of the MODEL sampling with perturbed-attention guidance (uniba.sana.pag)."""
    layers = parse_layers(applied_layers, sana_dit(model).config.depth)
    host.require_comfyui("PAG")
    patched = model.clone()

    def post_cfg_function(args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = args["sigma"]
        timestep = float(args["model"].model_sampling.timestep(sigma).reshape(-1)[0])
        current = scale_at(scale, adaptive_scale, float(int(timestep)))
        if current == 0:
            return denoised
        options = args["model_options"].copy()
        transformer_options = dict(options.get("transformer_options", {}))
        transformer_options[PERTURBED_BLOCKS_OPTION] = layers
        options["transformer_options"] = transformer_options
        (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], sigma, options)
        return denoised + current * (args["cond_denoised"] - perturbed)

    patched.set_model_sampler_post_cfg_function(post_cfg_function)
    return patched


install_lora_key_map()
