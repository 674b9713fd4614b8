"""Loading: release key coverage, strict checks, wrong files, conversion to safetensors (issue items 2, 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_infdit import TINY, sat_state_dict, write_tiny_infdit

from uniba.checkpoint import CheckpointError, matches_any, save_safetensors
from uniba.infdit import config_for_file, load_infdit, release_config
from uniba.infdit.cli import register  # noqa: F401 - the CLI module imports cleanly
from uniba.infdit.config import infer_config
from uniba.infdit.keys import IGNORED, ours_to_sat, sat_to_ours
from uniba.infdit.model import InfDiT

DATA = Path(__file__).resolve().parent / "data"


def test_every_release_key_is_mapped_with_its_shape_or_deliberately_ignored():
    manifest = json.loads((DATA / "infdit_full_manifest.json").read_text())
    entries = manifest["entries"]
    assert len(entries) == 426
    shapes = {e["key"]: tuple(e["shape"]) for e in entries}
    config = infer_config(shapes)
    assert config == release_config(with_clip=False)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in InfDiT(config).state_dict().items()}
    mapped = {}
    for key, shape in shapes.items():
        ours = sat_to_ours(key)
        if matches_any(key, IGNORED):
            assert ours is None or ours not in expected, key
            continue
        assert ours in expected, f"{key} is neither mapped nor ignored"
        assert expected[ours] == shape, key
        mapped[ours] = key
    assert set(mapped) == set(expected)  # nothing of the model is left without a source
    ignored = {e["key"] for e in entries if matches_any(e["key"], IGNORED)}
    assert set(manifest["unused_by_forward"]) <= ignored
    assert ignored - set(manifest["unused_by_forward"]) == {"mixins.adaln_layer.rope.freqs_cos",
                                                            "mixins.adaln_layer.rope.freqs_sin"}
    assert sum(e["numel"] for e in entries if e["key"] in mapped.values()) == 753_762_928 - 327_680 - 4_480


def test_key_names_round_trip():
    with torch.device("meta"):
        keys = list(InfDiT(TINY).state_dict())
    assert all(sat_to_ours(ours_to_sat(k)) == k for k in keys)


def test_release_pt_with_module_wrapper_and_converted_safetensors_give_the_same_model(tmp_path):
    pt = write_tiny_infdit(tmp_path, "mp_rank_00_model_states.pt")
    model = load_infdit(pt)
    assert model.clip is not None and model.config == TINY
    from uniba.cli import main

    out = tmp_path / "infdit.safetensors"
    assert main(["convert-infdit", str(pt), str(out)]) == 0
    converted = load_infdit(out)
    assert converted.config == model.config
    a, b = model.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert config_for_file(out) == model.config
    assert config_for_file(pt) == model.config  # from the pickle's shapes, nothing unpickled
    assert not list(tmp_path.glob("*.partial"))


def test_dtype_is_applied(tmp_path):
    model = load_infdit(write_tiny_infdit(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.clip.proj.dtype == torch.bfloat16


def test_a_missing_key_is_reported_strictly():
    state = sat_state_dict(TINY)
    del state["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    with pytest.raises(CheckpointError, match="missing key.*blocks.1.mlp.fc2.weight"):
        load_infdit(state)


def test_an_unexpected_key_is_reported():
    state = sat_state_dict(TINY)
    state["mixins.adaln_layer.something_new"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_infdit(state)


def test_sdxl_file_gets_a_wrong_family_error(tmp_path):
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_safetensors({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
                      "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not an Inf-DiT checkpoint; it looks like an SDXL") as err:
        load_infdit(path)
    assert "models/infdit" in str(err.value)
    with pytest.raises(CheckpointError, match="Inf-DiT"):
        config_for_file(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = write_tiny_infdit(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="download it again|truncated"):
        load_infdit(path)


def test_separate_open_clip_file(tmp_path):
    state = sat_state_dict(TINY)
    prefix = "image_encoder.model."
    visual = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix + "visual.")}
    without = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    assert load_infdit(without).clip is None
    clip_path = tmp_path / "open_clip_model.safetensors"
    save_safetensors({**visual, "token_embedding.weight": torch.zeros(4, 4)}, clip_path)
    model = load_infdit(without, clip=clip_path)
    assert model.clip is not None and model.config.clip == TINY.clip
