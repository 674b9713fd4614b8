"""Gemma-2 prompt encoding with the complex human instruction: parity with diffusers' SanaPipeline.encode_prompt."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_sana_te_vae import tiny_gemma_state_dict, write_tiny_gemma, write_tiny_gemma_single_file

from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.sana.text_encoder import CHI_TEXT, COMPLEX_HUMAN_INSTRUCTION, encode_prompt, load_text_encoder

pytest.importorskip("transformers")

PROMPTS = ["a red fox in a snowy forest at sunrise", "mountains, lake, reflections"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return write_tiny_gemma(root / "gemma-tiny"), write_tiny_gemma_single_file(root)


@pytest.fixture(scope="module")
def encoder(files):
    return load_text_encoder(files[0])


@pytest.fixture(scope="module")
def oracle(files):
    """diffusers' SanaPipeline around transformers' own loading of the same folder (test-only)."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer, Gemma2Model

    model = Gemma2Model.from_pretrained(str(files[0]), attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(files[0]))
    return diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None,
                                  scheduler=None)


def _ids_like_diffusers(tokenizer, prompts, use_chi):
    tokenizer.padding_side = "right"
    if use_chi:
        n_chi = len(tokenizer.encode(CHI_TEXT))
        out = tokenizer([CHI_TEXT + p for p in prompts], padding="max_length", max_length=n_chi + 298,
                        truncation=True, return_tensors="pt")
        select = [0] + list(range(-299, 0))
        return out["input_ids"][:, select], out["attention_mask"][:, select]
    out = tokenizer(prompts, padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def test_parity_with_diffusers_encode_prompt(encoder, oracle) -> None:
    # diffusers lower-cases prompts (SANA only strips them): lower-case prompts make both pipelines agree
    with torch.no_grad():
        pos, pos_mask, neg, neg_mask = oracle.encode_prompt(
            PROMPTS, negative_prompt="", device=torch.device("cpu"),
            complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION))
    emb, mask = encode_prompt(encoder, PROMPTS, use_chi=True)
    assert emb.shape == (2, 300, 2304) and mask.shape == (2, 300) and mask.dtype == torch.int64
    assert torch.equal(mask, pos_mask.to(torch.int64))
    assert (emb - pos).abs().max().item() <= 1e-5
    # the selected ids: BOS, then the prompt tokens from their first one, then right padding
    ids, _ = _ids_like_diffusers(oracle.tokenizer, PROMPTS, True)
    bos = oracle.tokenizer.bos_token_id
    assert ids[0, 0] == bos and ids[0, 1] != bos
    own = encoder.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert ids[0, 1:1 + len(own)].tolist()[1:] == own[1:]  # the first prompt token merges with "User Prompt: "'s space
    assert int(mask[0].sum()) == 1 + len(own)
    neg_emb, neg_m = encode_prompt(encoder, ["", ""], use_chi=False)
    assert torch.equal(neg_m, neg_mask.to(torch.int64))
    assert (neg_emb - neg).abs().max().item() <= 1e-5
    assert neg_m.sum(dim=1).tolist() == [1, 1]  # BOS only


def test_single_file_with_embedded_tokenizer_matches_folder(files, encoder) -> None:
    single = load_text_encoder(files[1])
    a, ma = encode_prompt(encoder, PROMPTS[:1])
    b, mb = encode_prompt(single, PROMPTS[:1])
    assert torch.equal(ma, mb)
    assert (a - b).abs().max().item() == 0.0


def test_empty_prompt_with_chi(encoder) -> None:
    """SANA's quirk: with nothing to merge into, the space after "User Prompt:" stays a token of its own."""
    emb, mask = encode_prompt(encoder, "")
    assert emb.shape == (1, 300, 2304)
    assert mask[0, :2].tolist() == [1, 1] and int(mask.sum()) == 2
    assert torch.isfinite(emb).all()


def test_long_prompt_truncated_with_warning(encoder, caplog) -> None:
    long = " ".join(["glowing street lamps"] * 200)
    with caplog.at_level(logging.WARNING, logger="uniba"):
        emb, mask = encode_prompt(encoder, long)
    assert "too long" in caplog.text and "300" in caplog.text
    assert emb.shape == (1, 300, 2304) and int(mask.sum()) == 300


def test_bf16_and_prompt_strip(files) -> None:
    enc = load_text_encoder(files[0], dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    a, _ = encode_prompt(enc, "  a cat  ")
    b, _ = encode_prompt(enc, "a cat")
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_not_gemma_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "t5xxl.safetensors"
    save_safetensors({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"t5xxl\.safetensors.*not a Gemma-2 text encoder.*T5"):
        load_text_encoder(path)


def test_single_file_without_tokenizer_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "gemma_no_tok.safetensors"
    save_safetensors(tiny_gemma_state_dict(), path)
    with pytest.raises(CheckpointError, match="no embedded tokenizer"):
        load_text_encoder(path)


def test_missing_layer_is_a_clear_error(tmp_path, files) -> None:
    import shutil

    folder = tmp_path / "gemma-broken"
    shutil.copytree(files[0], folder)
    state = tiny_gemma_state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key.*layers\.1\.mlp\.up_proj"):
        load_text_encoder(folder)


def test_folder_of_another_model_type(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(CheckpointError, match="'t5' model, not a Gemma-2"):
        load_text_encoder(tmp_path)
