"""Half-precision convolutions on the CPU run through fp32 (uniba/conv.py): same numbers as fp32-then-round,
same parameters as ``nn.Conv2d``, and no model of the pack sends a bf16 tensor to torch's CPU convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from uniba.conv import Conv2d, conv2d
from uniba.infdit.blockwise import denoise


class _HalfConvRecorder(TorchDispatchMode):
    """Records every aten convolution whose input reaches torch in bf16/fp16 on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.half_convs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "convolution" in name or "conv2d" in name:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
                self.half_convs.append(f"{name} {tuple(x.shape)} {x.dtype}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 4])
def test_half_conv_equals_fp32_rounded(dtype: torch.dtype, groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 8, 9, 7), generator=gen).to(dtype)
    w = torch.randn((12, 8 // groups, 3, 3), generator=gen).to(dtype)
    b = torch.randn((12,), generator=gen).to(dtype)
    out = conv2d(x, w, b, stride=2, padding=1, groups=groups)
    want = F.conv2d(x.float(), w.float(), b.float(), stride=2, padding=1, groups=groups).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, want)


def test_fp32_and_module_behave_like_torch() -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    ours = Conv2d(6, 4, 3, padding=1, groups=2)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 6, 5, 5)
    assert torch.equal(ours(x), ref(x))
    ours_bf16 = ours.to(torch.bfloat16)
    got = ours_bf16(x.bfloat16())
    want = F.conv2d(x.bfloat16().float(), ours_bf16.weight.float(), ours_bf16.bias.float(), padding=1, groups=2)
    assert torch.equal(got, want.bfloat16())


def _tiny_models_in_bf16() -> dict[str, nn.Module]:
    from tests.tiny_infdit import load_tiny_infdit
    from tests.tiny_sana import TINY as TINY_SANA
    from tests.tiny_sana_te_vae import TINY_DCAE
    from uniba.dcae.model import DCAE
    from uniba.sana.model import SanaDiT

    torch.manual_seed(0)
    return {"dcae": DCAE(TINY_DCAE), "infdit": load_tiny_infdit(), "sana": SanaDiT(TINY_SANA)}


def test_no_model_sends_half_precision_to_torch_cpu_conv() -> None:
    """Torch's CPU bf16 convolution is 100-300x slower than fp32 on CPUs without AVX-512 BF16."""
    models = _tiny_models_in_bf16()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        dcae = models["dcae"].to(torch.bfloat16)
        latent = torch.randn((1, dcae.config.latent_channels, 2, 2), generator=gen).bfloat16()
        with _HalfConvRecorder() as rec:
            image = dcae.decode(latent)
            dcae.encode(image)
        assert rec.half_convs == [], rec.half_convs[:3]

        sana = models["sana"].to(torch.bfloat16)
        cfg = sana.config
        x = torch.randn((1, cfg.in_channels, 4, 4), generator=gen).bfloat16()
        context = torch.randn((1, 5, cfg.caption_channels), generator=gen).bfloat16()
        with _HalfConvRecorder() as rec:
            out = sana(x, torch.tensor([500.0]), context, torch.ones((1, 5), dtype=torch.int64))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert rec.half_convs == [], rec.half_convs[:3]

        infdit = models["infdit"].to(torch.bfloat16)
        px = 2 * infdit.config.block_px
        lr = torch.rand((1, 3, px // 4, px // 4), generator=gen) * 2 - 1
        emb = F.normalize(torch.randn((1, infdit.config.vector_dim), generator=gen), dim=-1)
        with _HalfConvRecorder() as rec:
            out = denoise(infdit, torch.randn((1, 3, px, px), generator=gen), 1.0, lr, emb, block_batch=(2, 2))
            if infdit.clip is not None:
                infdit.clip.embed(lr)
        assert torch.isfinite(out.float()).all()
        assert rec.half_convs == [], rec.half_convs[:3]
