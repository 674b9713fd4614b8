"""Sana ControlNet and PAG: whole sampling paths against diffusers' SanaControlNetPipeline and SanaPAGPipeline
(tiny random models, the same embeddings and starting latent, output_type="latent"), ControlNet key formats."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_sana_te_vae import TINY_DCAE, tiny_dcae_state_dict
from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.dcae import load_dcae
from uniba.sana import SanaConfig, flow_sigmas, load_sana, sample_flow_dpm_solver
from uniba.sana.config import LATENT_SCALE, diffusers_config_dict
from uniba.sana.controlnet import SanaControlNet, control_residuals, load_controlnet, read_controlnet
from uniba.sana.keys import ours_to_original
from uniba.sana.model import SanaDiT
from uniba.sana.pag import PERTURBED_BLOCKS_OPTION, guided, parse_layers, scale_at

diffusers = pytest.importorskip("diffusers")

CONFIG = SanaConfig(hidden_size=64, depth=3, cross_heads=4, caption_channels=48)
CN_LAYERS = 2
STEPS, CFG = 4, 4.5


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in module.state_dict().values():
            value.copy_(torch.randn(value.shape, generator=g) * 0.1)
    return module.eval()


def _copy(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ref.state_dict().items()}


def _reference_controlnet() -> torch.nn.Module:
    accepted = inspect.signature(diffusers.SanaControlNetModel.__init__).parameters
    kwargs = {k: v for k, v in diffusers_config_dict(CONFIG).items() if k in accepted and k != "out_channels"}
    kwargs["num_layers"] = CN_LAYERS
    return _randomize(diffusers.SanaControlNetModel(**kwargs), 7)


def _embeddings():
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, 8, 48, generator=g), torch.randn(1, 8, 48, generator=g)
    cond_mask, uncond_mask = torch.ones(1, 8), torch.ones(1, 8)
    uncond_mask[0, 3:] = 0
    latent = torch.randn(1, 32, 2, 3, generator=g)
    return cond, cond_mask, uncond, uncond_mask, latent


def _scheduler():
    return diffusers.DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                 prediction_type="flow_prediction")


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_controlnet_whole_path_equals_diffusers_pipeline(strength: float) -> None:
    transformer = _randomize(diffusers.SanaTransformer2DModel(**diffusers_config_dict(CONFIG)), 0)
    controlnet = _reference_controlnet()
    vae = diffusers.AutoencoderDC(**TINY_DCAE.diffusers_kwargs()).eval()
    vae.load_state_dict(tiny_dcae_state_dict())
    cond, cond_mask, uncond, uncond_mask, latent = _embeddings()
    # [0, 1] like a ComfyUI IMAGE; diffusers takes a tensor as already normalised to [-1, 1] (a PIL image it would)
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    pipe = diffusers.SanaControlNetPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                            controlnet=controlnet, scheduler=_scheduler())
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt=None, prompt_attention_mask=cond_mask,
                        negative_prompt_embeds=uncond,
                        negative_prompt_attention_mask=uncond_mask, latents=latent.clone(), control_image=image * 2 - 1,
                        controlnet_conditioning_scale=strength, height=64, width=96, num_inference_steps=STEPS,
                        guidance_scale=CFG, output_type="latent", use_resolution_binning=False).images

    dit = load_sana(_copy(transformer), overrides={"cross_heads": 4})
    ours = load_controlnet(_copy(controlnet), overrides={"cross_heads": 4})
    dcae = load_dcae(tiny_dcae_state_dict())
    hint = dcae.encode(image * 2 - 1) * LATENT_SCALE  # the control image as a Sana latent, as ComfyUI's VAE gives it
    context, mask = torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])

    def denoiser(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x2, t = xt.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000
        control = control_residuals(ours, x2, hint, t, context, mask, strength)
        v_uncond, v_cond = dit(x2, t, context, mask, control=control).chunk(2)
        return xt - sigma * (v_uncond + CFG * (v_cond - v_uncond))

    def plain(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_uncond, v_cond = dit(xt.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000, context, mask).chunk(2)
        return xt - sigma * (v_uncond + CFG * (v_cond - v_uncond))

    with torch.no_grad():
        got = sample_flow_dpm_solver(denoiser, latent.clone(), flow_sigmas(STEPS, 3.0), disable=True)
        without = sample_flow_dpm_solver(plain, latent.clone(), flow_sigmas(STEPS, 3.0), disable=True)
    diff = (got - expected).abs().max().item()
    print(f"ControlNet strength {strength}: max abs diff {diff:.1e}; effect of the ControlNet "
          f"{(got - without).abs().max().item():.2f}")
    assert diff <= 1e-4 * max(1.0, expected.abs().max().item())
    assert (got - without).abs().max().item() > 0.05  # the ControlNet really acts


def test_original_controlnet_file_converts_like_diffusers_script(tmp_path: Path) -> None:
    ref = _reference_controlnet()
    state = _copy(ref)
    blocks = {k: v for k, v in state.items() if k.startswith("transformer_blocks.")}
    embedders = {k: v for k, v in state.items() if k.startswith(("patch_embed.", "time_embed.", "caption_"))}
    original: dict[str, torch.Tensor] = {}
    for key, value in ours_to_original({**blocks, **embedders}).items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks."):].split(".", 1)
            key = f"controlnet.{index}.copied_block.{rest}"
        original[key] = value
    original["controlnet.0.before_proj.weight"] = state["input_block.weight"]
    original["controlnet.0.before_proj.bias"] = state["input_block.bias"]
    for i in range(CN_LAYERS):
        original[f"controlnet.{i}.after_proj.weight"] = state[f"controlnet_blocks.{i}.weight"]
        original[f"controlnet.{i}.after_proj.bias"] = state[f"controlnet_blocks.{i}.bias"]
    # the released .pth also carries the base DiT it was trained with: not the ControlNet's, ignored
    original["blocks.0.attn.qkv.weight"] = torch.zeros(192, 64)
    original["final_layer.linear.weight"] = torch.zeros(32, 64)
    path = tmp_path / "Sana_tiny_ControlNet_HED.pth"
    torch.save({"state_dict": original}, path)
    converted, config = read_controlnet(path, overrides={"cross_heads": 4})
    assert config.depth == CN_LAYERS and config.hidden_size == 64
    assert set(converted) == set(state)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key
    load_controlnet(path, overrides={"cross_heads": 4})  # strict keys: nothing missing, nothing extra


def test_a_dit_given_as_controlnet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sana_dit.safetensors"
    save_safetensors(_copy(_randomize(diffusers.SanaTransformer2DModel(**diffusers_config_dict(CONFIG)), 0)), path)
    with pytest.raises(CheckpointError, match=r"sana_dit\.safetensors: is a Sana DiT, not a Sana ControlNet"):
        read_controlnet(path)


@pytest.mark.parametrize("adaptive", [0.0, 0.002])
def test_pag_whole_path_equals_diffusers_pipeline(adaptive: float) -> None:
    transformer = _randomize(diffusers.SanaTransformer2DModel(**diffusers_config_dict(CONFIG)), 0)
    dit = load_sana(_copy(transformer), overrides={"cross_heads": 4})
    vae = diffusers.AutoencoderDC(**TINY_DCAE.diffusers_kwargs()).eval()
    pipe = diffusers.SanaPAGPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=_scheduler(), pag_applied_layers=["transformer_blocks.1"])
    cond, cond_mask, uncond, uncond_mask, latent = _embeddings()
    pag_scale = 3.0
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt=None, prompt_attention_mask=cond_mask,
                        negative_prompt_embeds=uncond,
                        negative_prompt_attention_mask=uncond_mask, latents=latent.clone(), height=64, width=96,
                        num_inference_steps=STEPS, guidance_scale=CFG, pag_scale=pag_scale,
                        pag_adaptive_scale=adaptive, output_type="latent", use_resolution_binning=False).images

    layers = parse_layers("transformer_blocks.1", CONFIG.depth)
    context, mask = torch.cat([uncond, cond]), torch.cat([uncond_mask, cond_mask])

    def denoiser(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma * 1000
        v_uncond, v_cond = dit(xt.repeat(2, 1, 1, 1), t.repeat(2), context, mask).chunk(2)
        v_perturbed = dit(xt, t, cond, cond_mask, transformer_options={PERTURBED_BLOCKS_OPTION: layers})
        # diffusers computes the scale from the scheduler's integer timestep
        scale = scale_at(pag_scale, adaptive, float((sigma * 1000).long()))
        return xt - sigma * guided(v_uncond, v_cond, v_perturbed, CFG, scale)

    with torch.no_grad():
        got = sample_flow_dpm_solver(denoiser, latent.clone(), flow_sigmas(STEPS, 3.0), disable=True)
    diff = (got - expected).abs().max().item()
    print(f"PAG adaptive {adaptive}: max abs diff {diff:.1e}")
    assert diff <= 1e-4 * max(1.0, expected.abs().max().item())


def test_pag_layers_are_checked_against_the_depth() -> None:
    assert parse_layers("8", 20) == (8,) and parse_layers("7, 8, transformer_blocks.9", 20) == (7, 8, 9)
    with pytest.raises(ValueError, match="block 20 does not exist, this Sana model has 20 blocks"):
        parse_layers("20", 20)
    with pytest.raises(ValueError, match="'attn' is not a block index"):
        parse_layers("attn", 20)
    assert scale_at(3.0, 0.0, 10) == 3.0 and scale_at(3.0, 0.01, 900) == 2.0 and scale_at(3.0, 0.01, 0) == 0.0


def _nvlabs_reference(dit, cn_blocks, before, afters, x, hint, t, context, mask) -> torch.Tensor:
    """NVlabs' SanaMSControlNet.forward, transcribed (diffusion/model/nets/sana_multi_scale_controlnet.py): the
    branch starts from the DiT's first block output plus before_proj(x_embedder(hint)); skip i enters block i + 1."""
    b, _, h, w = x.shape
    t0, t_emb = dit.time_embed(t.long().float(), x.dtype)
    y = dit.caption_norm(dit.caption_projection(context))
    bias = ((1 - mask) * -10000.0)[:, None, None, :]
    hidden = dit.transformer_blocks[0](dit.patch_embed(x), y, bias, t0, h, w)
    signal = dit.patch_embed(hint)
    for i in range(1, len(cn_blocks) + 1):
        signal = cn_blocks[0](hidden + before(signal), y, bias, t0, h, w) if i == 1 else \
            cn_blocks[i - 1](signal, y, bias, t0, h, w)
        hidden = dit.transformer_blocks[i](hidden + afters[i - 1](signal), y, bias, t0, h, w)
    for block in dit.transformer_blocks[len(cn_blocks) + 1:]:
        hidden = block(hidden, y, bias, t0, h, w)
    shift, scale = (dit.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)
    hidden = F.layer_norm(hidden, (CONFIG.hidden_size,), eps=1e-6) * (1 + scale) + shift
    return dit.proj_out(hidden).reshape(b, h, w, -1).permute(0, 3, 1, 2)


def test_nvlabs_wiring_equals_the_original_forward(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    dit = load_sana({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in SanaDiT(CONFIG).state_dict().items()},
                    overrides={"cross_heads": 4})
    branch = {k: torch.randn(v.shape, generator=g) * 0.1
              for k, v in SanaControlNet(CONFIG.replace(depth=CN_LAYERS)).state_dict().items()}
    original = ours_to_original(dit.state_dict())  # the released file holds the whole base DiT ...
    for key, value in ours_to_original({k: v for k, v in branch.items() if k.startswith("transformer_")}).items():
        index, rest = key[len("blocks."):].split(".", 1)
        original[f"controlnet.{index}.copied_block.{rest}"] = value  # ... plus the branch
    original["controlnet.0.before_proj.weight"] = branch["input_block.weight"]
    original["controlnet.0.before_proj.bias"] = branch["input_block.bias"]
    for i in range(CN_LAYERS):
        original[f"controlnet.{i}.after_proj.weight"] = branch[f"controlnet_blocks.{i}.weight"]
        original[f"controlnet.{i}.after_proj.bias"] = branch[f"controlnet_blocks.{i}.bias"]
    path = tmp_path / "Sana_tiny_ControlNet_HED.pth"
    torch.save({"state_dict": original}, path)
    controlnet = load_controlnet(path, overrides={"cross_heads": 4}, wiring="nvlabs")

    cn_blocks = SanaDiT(CONFIG.replace(depth=CN_LAYERS)).transformer_blocks
    cn_blocks.load_state_dict({k[len("transformer_blocks."):]: v for k, v in branch.items()
                               if k.startswith("transformer_blocks.")})
    before, afters = torch.nn.Linear(64, 64), torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(CN_LAYERS)])
    before.load_state_dict({"weight": branch["input_block.weight"], "bias": branch["input_block.bias"]})
    afters.load_state_dict({k[len("controlnet_blocks."):]: v for k, v in branch.items()
                            if k.startswith("controlnet_blocks.")})
    x, hint = torch.randn(2, 32, 2, 3, generator=g), torch.randn(2, 32, 2, 3, generator=g)
    context, mask = torch.randn(2, 8, 48, generator=g), torch.ones(2, 8)
    mask[1, 4:] = 0
    t = torch.tensor([999.0, 400.0])
    with torch.no_grad():
        expected = _nvlabs_reference(dit, cn_blocks, before, afters, x, hint, t, context, mask)
        got = dit(x, t, context, mask, control=control_residuals(controlnet, x, hint, t, context, mask))
        diffusers_wired = dit(x, t, context, mask, control=control_residuals(
            load_controlnet(path, overrides={"cross_heads": 4}), x, hint, t, context, mask))
    assert (got - expected).abs().max().item() <= 1e-5
    assert (diffusers_wired - expected).abs().max().item() > 1e-3  # the two wirings really differ


def test_nvlabs_wiring_needs_the_original_file() -> None:
    state = {k: torch.zeros(v.shape) for k, v in SanaControlNet(CONFIG.replace(depth=CN_LAYERS)).state_dict().items()}
    with pytest.raises(CheckpointError, match="has no copy of the DiT's first block.*Choose wiring 'diffusers'"):
        read_controlnet(state, overrides={"cross_heads": 4}, wiring="nvlabs")
