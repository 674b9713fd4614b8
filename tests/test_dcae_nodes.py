"""The DC-AE VAE headless: every decode/encode entry point a stock ComfyUI node may call gives the exact result."""

from __future__ import annotations

import pytest
import torch
from tiny_sana_te_vae import write_tiny_dcae

nodes = pytest.importorskip("uniba_pack.nodes.sana_text_vae_nodes")
comfy_sana = pytest.importorskip("uniba_pack.nodes.comfy.sana")

EXACT = 1e-5


@pytest.fixture
def vae(tmp_path, monkeypatch, one_thread):
    write_tiny_dcae(tmp_path / "vae", "dcae_tiny.safetensors")
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    (loaded,) = nodes.SanaVAELoader().load("dcae_tiny.safetensors", "fp32")
    return loaded


def test_stock_tiled_entry_points_give_the_one_pass_image(vae) -> None:
    latent = torch.randn(1, 32, 3, 5, generator=torch.Generator().manual_seed(0))
    want = (vae.dcae.decode_full(latent) * 0.5 + 0.5).clamp(0, 1).movedim(1, -1)
    # VAE Decode; VAE Decode (Tiled) with 64 px tiles (its tile_x is in latent cells) and overlap 16 px;
    # Sana VAE Decode with 64 and 96 px tiles
    results = {"decode": vae.decode(latent), "decode_tiled": vae.decode_tiled(latent, tile_x=2, tile_y=2, overlap=0),
               "node 64": nodes.SanaVAEDecode().decode(vae, {"samples": latent}, 64)[0],
               "node 96": nodes.SanaVAEDecode().decode(vae, {"samples": latent}, 96)[0]}
    for name, image in results.items():
        assert image.shape == (1, 96, 160, 3), name
        assert (image - want).abs().max().item() <= EXACT, name
    pixels = torch.rand(1, 96, 160, 3, generator=torch.Generator().manual_seed(1))
    one = vae.encode(pixels)
    tiled = vae.encode_tiled(pixels, tile_x=64, tile_y=64, overlap=16)
    assert tiled.shape == one.shape == (1, 32, 3, 5)
    assert (tiled - one).abs().max().item() <= EXACT * max(1.0, one.abs().max().item())


def test_stock_tile_sizes_map_to_pixels() -> None:
    assert comfy_sana.stock_tile_px(16, 16, 32) == 512  # VAEDecodeTiled: 512 px // compression 32
    assert comfy_sana.stock_tile_px(512, 256, 1) == 512  # VAEEncodeTiled passes pixels
    assert comfy_sana.stock_tile_px(None, None, 32) == 0  # automatic
