"""Sana-Sprint nodes and the whole-pipeline-folder loader, headless; sana-info / convert-sana on pipeline folders."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_sana import TINY, TINY_SPRINT, tiny_sana_state_dict, write_tiny_sana_dit
from tiny_sana_te_vae import write_tiny_gemma, write_tiny_pipeline

from uniba.checkpoint import CheckpointError
from uniba.sana.config import SPRINT_GUIDANCE
from uniba.sana.loader import pipeline_parts

sprint_nodes = pytest.importorskip("uniba_pack.nodes.sana_sprint_nodes")
sana_nodes = pytest.importorskip("uniba_pack.nodes.sana_nodes")
comfy_sana = pytest.importorskip("uniba_pack.nodes.comfy.sana")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gemma = write_tiny_gemma(root / "gemma-src")
    write_tiny_pipeline(root / "diffusion_models" / "Sana_Sprint_tiny_diffusers", gemma, TINY_SPRINT)
    write_tiny_pipeline(root / "diffusion_models" / "Sana_tiny_diffusers", gemma, TINY)
    write_tiny_sana_dit(root / "diffusion_models", "sana_tiny.safetensors")
    return root


@pytest.fixture
def headless_models(models_dir, monkeypatch):
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(models_dir))
    return models_dir


def test_pipeline_loader_gives_the_three_loaders_results(headless_models) -> None:
    choices = sprint_nodes.SanaPipelineLoader.INPUT_TYPES()["required"]["pipeline_name"][0]
    assert choices == ["Sana_Sprint_tiny_diffusers/", "Sana_tiny_diffusers/"]
    assert "Sana_Sprint_tiny_diffusers/" in sana_nodes.SanaDiTLoader.INPUT_TYPES()["required"]["unet_name"][0]
    model, text_encoder, vae = sprint_nodes.SanaPipelineLoader().load("Sana_Sprint_tiny_diffusers/", "fp32",
                                                                      "auto", "auto")
    config = comfy_sana.dit_config(model)
    assert config.is_sprint and config.depth == TINY_SPRINT.depth and config.qk_norm
    expected = tiny_sana_state_dict(TINY_SPRINT)
    assert all(torch.equal(v, expected[k]) for k, v in model.model.state_dict().items())
    # the same objects the separate loaders give, from the parts of the folder
    (separate,) = sana_nodes.SanaDiTLoader().load("Sana_Sprint_tiny_diffusers/transformer", "fp32")
    assert comfy_sana.dit_config(separate) == config
    assert text_encoder.patcher.model.config.hidden_size == 2304 and text_encoder.tokenizer is not None
    assert vae.dcae.config.latent_channels == 32
    (regular, _, _) = sprint_nodes.SanaPipelineLoader().load("Sana_tiny_diffusers/", "fp32", "auto", "auto")
    assert not comfy_sana.dit_config(regular).is_sprint


@pytest.mark.parametrize("part", ["vae", "tokenizer", "transformer"])
def test_incomplete_pipeline_folder_names_the_missing_part(tmp_path, models_dir, part: str) -> None:
    broken = shutil.copytree(models_dir / "diffusion_models" / "Sana_Sprint_tiny_diffusers", tmp_path / "broken")
    shutil.rmtree(broken / part)
    with pytest.raises(CheckpointError, match=f"has no complete '{part}' subfolder"):
        pipeline_parts(broken)


def test_sprint_and_regular_models_are_sent_to_their_nodes(headless_models) -> None:
    (sprint,) = sana_nodes.SanaDiTLoader().load("Sana_Sprint_tiny_diffusers/", "fp32")
    (regular,) = sana_nodes.SanaDiTLoader().load("sana_tiny.safetensors", "fp32")
    with pytest.raises(ValueError, match="this one is a regular Sana DiT: load Sana_Sprint_"):
        sprint_nodes.SanaSprintSigmas().get_sigmas(regular, 2, 1.5708, 1.3)
    latent = {"samples": torch.zeros(1, 32, 2, 2)}
    cond = [[torch.zeros(1, 300, 2304), {"attention_mask": torch.ones(1, 300)}]]
    with pytest.raises(ValueError, match="this MODEL is Sana-Sprint .*'Sana Sprint Sigmas \\(UniBA\\)'"):
        sana_nodes.SanaSampler().sample(sprint, cond, cond, latent, 0, 20, 4.5, "flow_dpm_solver", 0.0, 1.0)
    (sigmas,) = sprint_nodes.SanaSprintSigmas().get_sigmas(sprint, 2, 1.5708, 1.3)
    assert sigmas.shape == (3,) and sigmas[-1] == 0


def test_guidance_node_sets_the_conditioning_value() -> None:
    cond = [[torch.zeros(1, 300, 2304), {"attention_mask": torch.ones(1, 300)}]]
    (out,) = sprint_nodes.SanaSprintGuidance().apply(cond, 3.0)
    assert out[0][1]["guidance"] == 3.0 and "guidance" not in cond[0][1]  # the input is not modified
    default = sprint_nodes.SanaSprintGuidance.INPUT_TYPES()["required"]["guidance"][1]["default"]
    assert default == SPRINT_GUIDANCE == 4.5


def test_cli_names_sprint_and_converts_a_pipeline_folder(models_dir, tmp_path, capsys) -> None:
    from uniba.cli import main
    from uniba.sana.loader import read_sana_checkpoint

    folder = models_dir / "diffusion_models" / "Sana_Sprint_tiny_diffusers"
    assert main(["sana-info", str(folder)]) == 0
    info = capsys.readouterr().out
    assert "Sana-Sprint DiT" in info.splitlines()[0] and "guidance_embeds: True" in info
    out = tmp_path / "sprint.safetensors"
    assert main(["convert-sana", str(folder), str(out), "--to", "original"]) == 0
    assert "Sana-Sprint DiT" in capsys.readouterr().out
    back = read_sana_checkpoint(out)
    assert back.source_format == "original" and back.config.is_sprint
    assert all(torch.equal(v, tiny_sana_state_dict(TINY_SPRINT)[k]) for k, v in back.state_dict.items())
