"""The CLIP visual tower against transformers' CLIPVisionModelWithProjection (independent oracle), and preprocessing.

open_clip needs torchvision (not installable here without another torch), so transformers is the oracle.
"""

from __future__ import annotations

import pytest
import torch

from uniba.infdit.clip import ClipVisionTower
from uniba.infdit.config import ClipVisionConfig

transformers = pytest.importorskip("transformers")

CONFIG = ClipVisionConfig(width=64, layers=2, heads=2, patch_size=8, image_size=32, mlp_hidden=96, output_dim=24)


def _random_tower(seed: int = 0) -> ClipVisionTower:
    torch.manual_seed(seed)
    tower = ClipVisionTower(CONFIG)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1) + (1.0 if name.endswith("weight") and
                                                                            p.ndim == 1 else 0.0))
    return tower.eval()


def _to_transformers(tower: ClipVisionTower):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=CONFIG.width, intermediate_size=CONFIG.mlp_hidden,
                           num_hidden_layers=CONFIG.layers, num_attention_heads=CONFIG.heads,
                           image_size=CONFIG.image_size, patch_size=CONFIG.patch_size, projection_dim=CONFIG.output_dim,
                           hidden_act="gelu", layer_norm_eps=1e-5)
    oracle = CLIPVisionModelWithProjection(cfg).eval()
    s = tower.state_dict()
    w = CONFIG.width
    mapped = {
        "vision_model.embeddings.class_embedding": s["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": s["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": s["positional_embedding"],
        "vision_model.pre_layrnorm.weight": s["ln_pre.weight"], "vision_model.pre_layrnorm.bias": s["ln_pre.bias"],
        "vision_model.post_layernorm.weight": s["ln_post.weight"],
        "vision_model.post_layernorm.bias": s["ln_post.bias"],
        "visual_projection.weight": s["proj"].t(),
    }
    for i in range(CONFIG.layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        qkv_w, qkv_b = s[src + "attn.in_proj_weight"], s[src + "attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            mapped[dst + f"self_attn.{name}.weight"] = qkv_w[j * w:(j + 1) * w]
            mapped[dst + f"self_attn.{name}.bias"] = qkv_b[j * w:(j + 1) * w]
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            mapped[dst + b + ".weight"] = s[src + a + ".weight"]
            mapped[dst + b + ".bias"] = s[src + a + ".bias"]
    missing, unexpected = oracle.load_state_dict(mapped, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return oracle


def test_tower_matches_transformers_clip_vision_with_projection():
    tower = _random_tower()
    oracle = _to_transformers(tower)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower(pixels)
        ref = oracle(pixel_values=pixels).image_embeds
    assert (ours - ref).abs().max().item() <= 1e-5


def test_preprocessing_resizes_the_short_side_and_centre_crops():
    tower = _random_tower()
    wide = torch.rand(1, 3, 40, 100) * 2 - 1
    pixels = tower.preprocess(wide)
    assert pixels.shape == (1, 3, 32, 32)
    resized = torch.nn.functional.interpolate((wide + 1) / 2, size=(32, 80), mode="bicubic", align_corners=False,
                                              antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(pixels, (resized[..., :, 24:56] - mean) / std)
    emb = tower.embed(wide)
    assert emb.shape == (1, 24) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
