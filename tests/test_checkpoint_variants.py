"""Checkpoint variants users have (issue 14 item 5): each loads, or the error names the file and what to do.

Sana: sharded diffusers folders, files saved with a ``model.diffusion_model.`` or ``net.`` prefix, fp16/fp32 copies
of bf16 releases (an fp16 copy that overflowed is refused with the fix). Inf-DiT: the DeepSpeed release converted
to safetensors with and without its CLIP tower, and fp16/fp32 copies. All on tiny random models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.make_release_size import write_sharded
from tests.tiny_infdit import TINY as TINY_INFDIT
from tests.tiny_infdit import write_tiny_infdit
from tests.tiny_sana import TINY as TINY_SANA
from tests.tiny_sana import tiny_sana_state_dict, to_original_format
from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.sana.config import diffusers_config_dict
from uniba.sana.loader import load_sana


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.fixture(scope="module")
def sana_bf16() -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in tiny_sana_state_dict(TINY_SANA).items()}


def _write_sana_original(path: Path, state: dict[str, torch.Tensor], prefix: str = "") -> Path:
    original = to_original_format({k: v.float() for k, v in state.items()}, TINY_SANA)
    dtype = next(iter(state.values())).dtype
    torch.save({"state_dict": {prefix + k: v.to(dtype) for k, v in original.items()}}, path)
    (path.parent / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel",
                                                         "num_cross_attention_heads": 4, "num_layers": 2}))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "net."])
def test_sana_prefixed_files_load_the_same_weights(tmp_path: Path, sana_bf16, prefix: str) -> None:
    plain = load_sana(_write_sana_original(_mk(tmp_path, "plain"), sana_bf16))
    model = load_sana(_write_sana_original(_mk(tmp_path, "prefixed"), sana_bf16, prefix))
    assert model.dtype == torch.bfloat16
    assert _same(model, plain)


def _mk(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "Sana_tiny.pth"


def test_sana_sharded_diffusers_folder_equals_the_single_file(tmp_path: Path, sana_bf16) -> None:
    folder = tmp_path / "Sana_tiny_diffusers" / "transformer"
    folder.mkdir(parents=True)
    config = {"_class_name": "SanaTransformer2DModel", **diffusers_config_dict(TINY_SANA)}
    (folder / "config.json").write_text(json.dumps(config))
    spec = {k: (tuple(v.shape), v.dtype) for k, v in sana_bf16.items()}
    shards = write_sharded(folder, "diffusion_pytorch_model", spec, lambda k, s, d: sana_bf16[k],
                           max_shard_bytes=200_000)
    assert len(shards) >= 3
    model = load_sana(folder)
    single = load_sana(_write_sana_original(_mk(tmp_path, "single"), sana_bf16))
    assert _same(model, single)
    (shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing the shard '{shards[1].name}'.*Download every shard"):
        load_sana(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sana_fp16_and_fp32_copies_of_a_bf16_release_load(tmp_path: Path, sana_bf16, dtype: torch.dtype) -> None:
    copy = {k: v.to(dtype) for k, v in sana_bf16.items()}
    model = load_sana(_write_sana_original(_mk(tmp_path, str(dtype)), copy))
    assert model.dtype == dtype
    as_bf16 = load_sana(_write_sana_original(_mk(tmp_path, str(dtype) + "b"), copy), torch.bfloat16).state_dict()
    reference = load_sana(_write_sana_original(_mk(tmp_path, "ref"), sana_bf16)).state_dict()
    for key, value in reference.items():  # fp32 holds bf16 exactly; fp16 rounds values under 6e-5 (subnormals)
        torch.testing.assert_close(as_bf16[key].float(), value.float(), rtol=0, atol=0 if dtype == torch.float32
                                   else 6e-5)


def test_an_overflowed_fp16_copy_is_refused_with_the_fix(tmp_path: Path, sana_bf16) -> None:
    big = dict(sana_bf16)
    key = "transformer_blocks.0.ff.conv_point.weight"
    big[key] = big[key].clone()
    big[key].view(-1)[3] = 1e6  # fine in bf16, inf in fp16
    copy = {k: v.to(torch.float16) for k, v in big.items()}
    path = tmp_path / "Sana_tiny_copy.safetensors"
    save_safetensors(copy, path)
    with pytest.raises(CheckpointError) as err:
        load_sana(path)
    text = str(err.value)
    assert str(path) in text and "fp16" in text and "bf16" in text and "infinite" in text


@pytest.fixture(scope="module")
def deepspeed_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mp_rank_00_model_states.pt with every DeepSpeed/SAT entry (numpy RNG state included)."""
    return write_tiny_infdit(tmp_path_factory.mktemp("infdit"), "mp_rank_00_model_states.pt")


def test_infdit_release_converted_with_and_without_clip_tower(tmp_path: Path, deepspeed_release: Path) -> None:
    from tiny_infdit import plan_and_upscale

    from uniba.infdit import load_infdit
    from uniba.infdit.loader import convert_checkpoint

    release = load_infdit(deepspeed_release)
    with_clip = tmp_path / "infdit.safetensors"
    convert_checkpoint(deepspeed_release, with_clip)
    converted = load_infdit(with_clip)
    assert converted.clip is not None and converted.config == TINY_INFDIT and _same(converted, release)

    without = tmp_path / "infdit_no_clip.safetensors"
    state = {k: v for k, v in converted.state_dict().items() if not k.startswith("clip.")}
    from uniba.infdit.config import METADATA_KEY

    save_safetensors(state, without, metadata={METADATA_KEY: TINY_INFDIT.replace(clip=None).to_json()})
    bare = load_infdit(without)
    assert bare.clip is None
    lr = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="no CLIP image tower.*--clip"):
        plan_and_upscale(bare, lr, steps=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_infdit_fp16_and_fp32_copies_load(tmp_path: Path, deepspeed_release: Path, dtype: torch.dtype) -> None:
    from uniba.infdit import load_infdit
    from uniba.infdit.loader import convert_checkpoint

    path = tmp_path / f"infdit_{dtype}.safetensors".replace("torch.", "")
    convert_checkpoint(deepspeed_release, path, dtype=dtype)
    model = load_infdit(path)
    assert model.dtype == dtype and model.clip is not None
    assert load_infdit(path, torch.float32).dtype == torch.float32
