"""Gemma-2-2B prompt encoding for Sana, with the "complex human instruction" (CHI) prefix.

Runs transformers' ``Gemma2Model`` (eager attention, so the attention-logit soft-capping of 50
is applied) and takes the last hidden state after the final RMSNorm, as SANA's
``get_tokenizer_and_text_encoder(...).get_decoder()`` does. Quirks reproduced (docs/SOURCES.md, Sana §4):

* the CHI lines joined by newlines and prepended to the prompt; ``max_length_all = n_chi + 300 - 2``
  ("magic number 2: [bos], [_]"), right padding, truncation, BOS added;
* ``select_index = [0] + range(-299, 0)``: BOS plus the 299 positions that start at the first
  prompt token, each contextualised by the CHI through causal attention;
* the negative / unconditional prompt is encoded without CHI at length 300, no re-indexing;
* prompts are ``strip()``-ed like SANA's pipeline (diffusers additionally lower-cases them).

Two on-disk forms load: a Hugging Face folder (config.json, safetensors, tokenizer files) and
the single-file Gemma-2-2B that ComfyUI ships for Lumina 2 (keys ``model.*`` plus an embedded
sentencepiece model ``spiece_model``, from which the tokenizer is built).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uniba.checkpoint import (
    CheckpointError,
    check_file,
    load_model,
    read_json,
    read_safetensors_metadata,
    read_sharded_folder,
    read_state_dict,
    strip_prefix,
    wrong_family_error,
)
from uniba.guards import check_text
from uniba.progress import ProgressFn

log = logging.getLogger("uniba")

FAMILY = "Gemma-2 text encoder"
MAX_LENGTH = 300
CONFIG_METADATA_KEY = "gemma2_config"

# SANA's configs (and both ComfyUI forks) write "Enhanced prompt" with double quotes; diffusers'
# default list uses single quotes, which tokenizes differently. This is SANA's text.
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
CHI_TEXT = "\n".join(COMPLEX_HUMAN_INSTRUCTION)

# Working memory of one prompt's encoding above the weights (at most 300 tokens plus the instruction), as
# requested from the host before encoding.
ENCODE_WORK_BYTES = 256 * 1024**2
_GEMMA_FINGERPRINT = "layers.0.pre_feedforward_layernorm.weight"
_IGNORED = ("lm_head.weight", "spiece_model")


@dataclass
class SanaTextEncoder:
    """A loaded Gemma-2 decoder (``model``: ``transformers.Gemma2Model``) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any
    source: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# --------------------------------------------------------------------------- encoding

def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


@torch.no_grad()
def encode_prompt(text_encoder: SanaTextEncoder, prompts: str | Sequence[str], use_chi: bool = True,
                  max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts as Sana does: ``(embeddings (B, max_length, hidden), mask (B, max_length) int64)``.

    ``use_chi=True`` for the positive prompt; ``False`` for the negative/unconditional one.
    Prompts longer than the model reads are truncated with a warning.
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    prompts = [check_text(p, "prompt" if single else f"prompts[{i}]").strip() for i, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("prompts: the list is empty; give at least one prompt (an empty text is fine).")
    tokenizer = text_encoder.tokenizer
    tokenizer.padding_side = "right"
    if use_chi:
        texts = [CHI_TEXT + p for p in prompts]
        n_chi = len(tokenizer.encode(CHI_TEXT))
        length_all = n_chi + max_length - 2  # magic number 2: [bos], [_]
    else:
        texts, length_all = prompts, max_length
    for i, text in enumerate(texts):
        n = _count_tokens(tokenizer, text)
        if n > length_all:
            log.warning("Sana prompt %d is %d tokens too long: Sana reads %d tokens (with the start token), the rest "
                        "was cut off. Shorten the prompt.", i, n - length_all, max_length)
    tokens = tokenizer(texts, padding="max_length", max_length=length_all, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    device = text_encoder.device
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    hidden = text_encoder.model(ids, attention_mask=mask)[0]
    if use_chi:
        select = [0] + list(range(-max_length + 1, 0))
        hidden, mask = hidden[:, select], mask[:, select]
    return hidden, mask.to(torch.int64)


# --------------------------------------------------------------------------- loading

def _gemma_config_from_shapes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Any:
    from transformers import Gemma2Config  # optional dependency, heavy: imported on first use

    if CONFIG_METADATA_KEY in metadata:
        return Gemma2Config(**json.loads(metadata[CONFIG_METADATA_KEY]))
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = 256  # Gemma-2 2B/9B/27B all use 256; not readable from the projection shapes
    return Gemma2Config(
        vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
        intermediate_size=int(state["layers.0.mlp.gate_proj.weight"].shape[0]),
        num_attention_heads=int(state["layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
        num_key_value_heads=int(state["layers.0.self_attn.k_proj.weight"].shape[0]) // head_dim,
        head_dim=head_dim, query_pre_attn_scalar=head_dim,
    )


def _tokenizer_from_spiece(data: torch.Tensor, path: str) -> Any:
    from transformers import GemmaTokenizer  # optional dependency, heavy: imported on first use

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "tokenizer.model").write_bytes(data.to(torch.uint8).cpu().numpy().tobytes())
        try:
            return GemmaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        except Exception as exc:  # noqa: BLE001 - any failure here means the embedded tokenizer is unusable
            raise CheckpointError(path, f"has an embedded tokenizer (spiece_model) that could not be read ({exc}).",
                                  "Download the file again, or use the Hugging Face folder of gemma-2-2b-it.") from None


def _build_model(config: Any, state: dict[str, torch.Tensor], path: str, dtype: torch.dtype | None,
                 progress: ProgressFn | None = None) -> Any:
    from transformers import Gemma2Model  # optional dependency, heavy: imported on first use

    config._attn_implementation = "eager"  # logit soft-capping exists only in eager attention
    # real buffers: Gemma computes its rotary table and embedding scale in the constructor
    return load_model(lambda: Gemma2Model(config), state, path=path, family=FAMILY, ignore=_IGNORED, dtype=dtype,
                      real_buffers=True, progress=progress)


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gemma2Model's own keys from a causal-LM (``model.``) or multimodal (``model.language_model.``) file."""
    return strip_prefix(state, ("model.language_model.", "language_model.model.", "model."),
                        marker=lambda key: key.startswith("layers."))


# What AutoTokenizer may open in a Hugging Face folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json")


def load_text_encoder(path_or_folder: str | os.PathLike, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> SanaTextEncoder:
    """Load Gemma-2 from a Hugging Face folder or a single safetensors file with an embedded tokenizer."""
    from transformers import AutoConfig, AutoTokenizer  # optional dependency, heavy: imported on first use

    path = os.fspath(path_or_folder)
    if os.path.isdir(path):
        folder, tokenizer_folder = path, path
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "text_encoder")):
            folder = os.path.join(path, "text_encoder")  # a whole Sana diffusers pipeline folder
            tokenizer_folder = os.path.join(path, "tokenizer")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(folder, "has no config.json, so it is not a Hugging Face model folder.",
                                  "Download the whole gemma-2-2b-it folder (config, safetensors, tokenizer files).")
        # every file transformers will open is checked first: a pipe would block it, damage would escape raw
        read_json(os.path.join(folder, "config.json"), "Download the gemma-2-2b-it folder again.")
        for name in _TOKENIZER_FILES:
            if os.path.lexists(os.path.join(tokenizer_folder, name)):
                check_file(os.path.join(tokenizer_folder, name), fix="Download the tokenizer files again.")
        try:
            config = AutoConfig.from_pretrained(folder)
        except (ValueError, OSError, TypeError, KeyError) as exc:
            raise CheckpointError(os.path.join(folder, "config.json"), f"is not a usable model config "
                                  f"({type(exc).__name__}: {str(exc)[:200]}).",
                                  "Download the gemma-2-2b-it folder again.") from None
        config = getattr(config, "text_config", None) or config
        if getattr(config, "model_type", "") != "gemma2":
            raise CheckpointError(folder, f"holds a '{getattr(config, 'model_type', '?')}' model, not a {FAMILY}.",
                                  "Use google/gemma-2-2b-it (or Efficient-Large-Model/gemma-2-2b-it).")
        state = read_sharded_folder(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(tokenizer_folder, f"has no usable tokenizer ({type(exc).__name__}: {exc}).",
                                  "Copy tokenizer.json / tokenizer.model / tokenizer_config.json into the folder.") \
                from None
    else:
        state = read_state_dict(path)
        metadata = read_safetensors_metadata(path) if path.endswith((".safetensors", ".sft")) else {}
        if not any(k.endswith(_GEMMA_FINGERPRINT) for k in state):
            raise wrong_family_error(path, FAMILY, state.keys(),
                                     "Choose gemma_2_2b (the Lumina 2 text encoder file) or a gemma-2-2b-it folder "
                                     "in models/text_encoders/.")
        if "spiece_model" not in state:
            raise CheckpointError(path, "has the Gemma-2 weights but no embedded tokenizer (spiece_model).",
                                  "Use ComfyUI's gemma_2_2b file, or the Hugging Face gemma-2-2b-it folder.")
        tokenizer = _tokenizer_from_spiece(state["spiece_model"], path)
        config = None
    state = _normalise_keys(state)
    if not any(k.endswith(_GEMMA_FINGERPRINT) for k in state):
        raise wrong_family_error(path, FAMILY, state.keys())
    if config is None:
        config = _gemma_config_from_shapes(state, metadata)
    model = _build_model(config, state, path, dtype, progress)
    return SanaTextEncoder(model=model.to(device), tokenizer=tokenizer, source=path)
