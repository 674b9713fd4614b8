"""Tiny random Gemma-2 text encoders and DC-AEs with the real file layouts, for tests (no download).

* :func:`write_tiny_gemma` - a Hugging Face folder: tiny ``Gemma2Config`` (hidden 2304 so the
  conditioning has Sana's width), ``model.safetensors`` (``model.*`` keys) and a tiny tokenizer
  trained in-process with sentencepiece (the Gemma special-token ids: pad 0, eos 1, bos 2, unk 3).
* :func:`write_tiny_gemma_single_file` - the ComfyUI/Lumina-2 single file: ``model.*`` keys plus
  the sentencepiece model as a ``spiece_model`` uint8 tensor.
* :func:`write_tiny_dcae` - a DC-AE with the f32c32 structure (32x down, 32 latent channels,
  3 ResBlock + 3 EfficientViT stages, conv down / interpolate up) and tiny widths, in the
  diffusers or the original efficientvit key layout.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from uniba.checkpoint import save_safetensors
from uniba.dcae import keys as dcae_keys
from uniba.dcae.config import RES_BLOCK, VIT_BLOCK, DCAEConfig
from uniba.dcae.model import DCAE
from uniba.sana.text_encoder import CHI_TEXT, CONFIG_METADATA_KEY

TINY_GEMMA_CONFIG = dict(
    vocab_size=400, hidden_size=2304, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=1024, sliding_window=64,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)

TINY_DCAE = DCAEConfig(
    latent_channels=32, head_dim=8,
    encoder_widths=(8, 8, 16, 16, 32, 32), encoder_depths=(1, 1, 1, 1, 1, 1),
    encoder_blocks=(RES_BLOCK,) * 3 + (VIT_BLOCK,) * 3, encoder_scales=((), (), (), (5,), (5,), (5,)),
    decoder_widths=(8, 8, 16, 16, 32, 32), decoder_depths=(1, 1, 1, 1, 1, 1),
    decoder_blocks=(RES_BLOCK,) * 3 + (VIT_BLOCK,) * 3, decoder_scales=((), (), (), (5,), (5,), (5,)),
)

_CORPUS = [line for line in CHI_TEXT.split("\n")] + [
    "a cat sleeping on a warm sunny windowsill", "a busy city street at dusk with glowing lamps",
    "a red fox in a snowy forest at sunrise, soft golden light", "mountains, lake, reflections, 4k photo",
    "the quick brown fox jumps over the lazy dog", "portrait of an astronaut riding a horse on mars",
]


def tiny_spiece_model() -> bytes:
    """A 400-piece BPE sentencepiece model with byte fallback, laid out like Gemma's."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 10), model_writer=out, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_by_whitespace=False, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", minloglevel=2, num_threads=1,
    )
    return out.getvalue()


def tiny_gemma_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Gemma2 weights with the HF ``Gemma2ForCausalLM`` key names (``model.*``)."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    model = Gemma2Model(Gemma2Config(**TINY_GEMMA_CONFIG))
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("norm.weight"):
            v = torch.randn_like(v) * 0.2  # Gemma norms scale by (1 + w): keep them near 1
        state["model." + k] = v.contiguous()
    return state


def write_tiny_gemma(folder: Path) -> Path:
    """A Hugging Face folder with a tiny Gemma2 config, safetensors and tokenizer; returns the folder."""
    from transformers import GemmaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_GEMMA_CONFIG, model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                  torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_safetensors(tiny_gemma_state_dict(), folder / "model.safetensors")
    (folder / "tokenizer.model").write_bytes(tiny_spiece_model())
    tokenizer = GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_gemma_single_file(folder: Path, name: str = "gemma_tiny.safetensors") -> Path:
    """The single-file form (``model.*`` + ``spiece_model``), the config stored in the metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_gemma_state_dict()
    state["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    path = folder / name
    save_safetensors(state, path, metadata={CONFIG_METADATA_KEY: json.dumps(TINY_GEMMA_CONFIG)})
    return path


def tiny_dcae_state_dict(config: DCAEConfig = TINY_DCAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random DC-AE weights in diffusers key names (default conv init; norms perturbed around 1/0)."""
    torch.manual_seed(seed)
    model = DCAE(config)
    state = {}
    for k, v in model.state_dict().items():
        if ".norm" in k and k.endswith(".weight"):
            v = 1.0 + 0.1 * torch.randn_like(v)
        elif ".norm" in k and k.endswith(".bias"):
            v = 0.1 * torch.randn_like(v)
        state[k] = v.contiguous()
    return state


def write_tiny_dcae(folder: Path, name: str = "dcae_tiny.safetensors", fmt: str = "diffusers", *,
                    config: DCAEConfig = TINY_DCAE, seed: int = 0) -> Path:
    """Write a tiny DC-AE (``fmt`` "diffusers" or "original" efficientvit keys) and return its path."""
    if fmt not in ("diffusers", "original"):
        raise ValueError(f"fmt must be 'diffusers' or 'original', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_dcae_state_dict(config, seed)
    if fmt == "original":
        state = dcae_keys.diffusers_to_original(state, downsample=config.downsample)
    path = folder / name
    save_safetensors(state, path)
    return path


def write_tiny_pipeline(root: Path, gemma: Path, config: Any) -> Path:
    """A diffusers Sana pipeline folder as Hugging Face ships it (model_index.json and the five subfolders), with
    a tiny DiT of ``config`` (Sprint when ``config.guidance_embeds``), the Gemma folder ``gemma`` and a tiny DC-AE."""
    import shutil

    from tiny_sana import tiny_sana_state_dict

    from uniba.sana.config import diffusers_config_dict

    sprint = config.guidance_embeds
    root = Path(root)
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "SanaSprintPipeline" if sprint else "SanaPipeline",
        "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "SanaTransformer2DModel", **diffusers_config_dict(config)}))
    save_safetensors(tiny_sana_state_dict(config), root / "transformer" / "diffusion_pytorch_model.safetensors")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "SCMScheduler" if sprint else "DPMSolverMultistepScheduler", "sigma_data": 0.5}))
    shutil.copytree(gemma, root / "text_encoder")
    shutil.copytree(gemma, root / "tokenizer")
    write_tiny_dcae(root / "vae", "diffusion_pytorch_model.safetensors")
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderDC"}))
    return root
