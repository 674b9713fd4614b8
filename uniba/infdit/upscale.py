"""The public upscaler: any input size, 2x/4x/8x/16x, alpha, batches, block-wise sampling.

Per pass (infdit.md §3): reflect-pad the input (right/bottom) to whole blocks, bicubic-upsample it
for the concatenated channels, embed it with CLIP, start from ``x_T = up(LR) + sigma_max * noise``
(noise from a CPU generator seeded by ``seed``, so results do not depend on the device or on the
block batch), run 20 EDM Heun steps whose every denoiser call is computed block-wise, crop back.
Native 4x; 2x by the reference's trick (concatenate the 2x upsampling, but give CLIP and the LR
cross-attention the input downscaled by 2, so the network still sees a 4x relation); 8x = 4x then 2x,
16x = 4x then 4x.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..memory import device_free_bytes, is_out_of_memory
from ..progress import ProgressFn
from .blockwise import prepare_inputs, run_network
from .model import BlockRect, InfDiT, upsample_lr
from .plan import MIN_SIDE, padded_input, passes_for_scale, plan_upscale
from .sampling import DEFAULT_STEPS, get_sigmas_karras, model_evaluations, sample_heun_edm

log = logging.getLogger(__name__)

PREVIEW_MAX = 512


class RopeWrapWarning(UserWarning):
    """The output is larger than the RoPE table: positions wrap around, as in the reference."""


def reflect_pad(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad right/bottom by reflection (repeated when the pad exceeds the image), so content stays at (0, 0)."""
    while image.shape[-2] < height or image.shape[-1] < width:
        ph = min(height - image.shape[-2], image.shape[-2] - 1)
        pw = min(width - image.shape[-1], image.shape[-1] - 1)
        image = F.pad(image, (0, pw, 0, ph), mode="reflect")
    return image


def _blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype, device=image.device) / 16
    kernel = kernel.expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=radius)


def wavelet_split(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) frequencies by an a-trous wavelet of ``levels`` dilated 3x3 blurs."""
    high = torch.zeros_like(image)
    low = image
    for i in range(levels):
        blurred = _blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_match(output: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Keep the output's high frequencies and the (bicubic-upsampled) source's low frequencies."""
    up = F.interpolate(source.float(), size=output.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    high, _ = wavelet_split(output.float())
    _, low = wavelet_split(up)
    return high + low


class _Denoiser:
    """D(x; sigma) for the sampler: block-wise network calls, progress per block batch, preview."""

    def __init__(self, model: InfDiT, lr: torch.Tensor, concat_lr: torch.Tensor, clip_embedding: torch.Tensor,
                 block_batch: tuple[int, int], offload: bool, report: Callable[[torch.Tensor | None], None] | None,
                 is_oom: Callable[[BaseException], bool], preview: torch.Tensor | None, pool: int) -> None:
        self.model, self.lr, self.concat_lr, self.clip_embedding = model, lr, concat_lr, clip_embedding
        self.block_batch, self.offload, self.report, self.is_oom = block_batch, offload, report, is_oom
        self.preview, self.pool = preview, pool

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        concat_lr, emb, c_skip, c_out, c_in = prepare_inputs(self.model, x, sigma, self.lr, self.clip_embedding,
                                                             self.concat_lr)
        bp = self.model.config.block_px

        def on_batch(rect: BlockRect, denoised: torch.Tensor) -> None:
            if self.report is None:
                return
            if self.preview is not None:
                denoised = denoised[:1]
                small = F.avg_pool2d(denoised, self.pool) if self.pool > 1 else denoised
                p = bp // self.pool
                self.preview[:, rect.row0 * p:rect.row1 * p, rect.col0 * p:rect.col1 * p] = \
                    ((small[0] + 1) / 2).clamp(0, 1).cpu()
            self.report(self.preview)

        return run_network(self.model, x, concat_lr, c_in, self.lr, emb, self.block_batch, c_skip=c_skip,
                           c_out=c_out, offload_cache=self.offload, on_batch=on_batch, is_oom=self.is_oom)


def sample_canvas(model: InfDiT, lr: torch.Tensor, *, concat_lr: torch.Tensor | None = None,
                  clip_embedding: torch.Tensor, noise: torch.Tensor, steps: int = DEFAULT_STEPS,
                  block_batch: tuple[int, int] | int | None = None, offload_cache: bool = False,
                  report: Callable[[torch.Tensor | None], None] | None = None,
                  is_oom: Callable[[BaseException], bool] = is_out_of_memory,
                  preview: torch.Tensor | None = None, pool: int = 1) -> torch.Tensor:
    """The reference's ``sample``: EDM Heun from ``up(lr) + sigma_max * noise`` on a whole-block canvas (float32)."""
    height, width = noise.shape[-2:]
    if concat_lr is None:
        concat_lr = upsample_lr(lr, height, width)
    grid = (height // model.config.block_px, width // model.config.block_px)
    if block_batch is None:
        block_batch = grid
    elif isinstance(block_batch, int):
        block_batch = (block_batch, block_batch)
    sigmas = get_sigmas_karras(steps, device=noise.device)
    x = concat_lr.float() + sigmas[0] * noise.float()
    denoiser = _Denoiser(model, lr, concat_lr, clip_embedding, block_batch, offload_cache, report, is_oom,
                         preview, pool)
    return sample_heun_edm(denoiser, x, sigmas)


def _preview_pool(height: int, width: int, block_px: int) -> int:
    pool = 1
    while max(height, width) / pool > PREVIEW_MAX and pool < block_px:
        pool *= 2
    return pool


def _check_input(lr: torch.Tensor) -> torch.Tensor:
    if not isinstance(lr, torch.Tensor):
        raise TypeError(f"lr must be a tensor (B, C, H, W) in [-1, 1], got {type(lr).__name__}")
    if lr.ndim == 3:
        lr = lr[None]
    if lr.ndim != 4 or lr.shape[1] not in (3, 4):
        raise ValueError(f"lr must be (B, 3 or 4, H, W) in [-1, 1] (RGB, optionally with alpha), got {tuple(lr.shape)}")
    if min(lr.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"the input image is {lr.shape[-1]}x{lr.shape[-2]} px; Inf-DiT needs at least "
                         f"{MIN_SIDE} px on each side: upscale it conventionally first")
    return lr


@torch.no_grad()
def upscale(model: InfDiT, lr: torch.Tensor, *, scale: int = 4, steps: int = DEFAULT_STEPS, seed: int = 0,
            noise: torch.Tensor | None = None, clip_embedding: torch.Tensor | None = None,
            block_batch: str | int | tuple[int, int] = "auto", offload_cache: str | bool = "auto",
            progress: ProgressFn | None = None, color_match: str = "none", free_bytes: int | None = None,
            is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
    """Upscale ``lr`` (B, 3 or 4, h, w) in [-1, 1] by ``scale`` (2, 4, 8, 16) to (B, C, h*scale, w*scale).

    The result is not clipped (like the reference's ``sample()``): clip it to [-1, 1] when saving.

    ``noise`` (B, 3, H, W) on the padded canvas replaces the seeded draw (single-pass scales only) and
    ``clip_embedding`` (B or 1, vector_dim) replaces the CLIP tower's embedding, so results can be
    compared exactly with the reference. ``block_batch``: ``"auto"`` (largest n that fits the free
    memory), an int n or (n_h, n_w). ``offload_cache``: auto/on/off (or a bool). ``progress(done,
    total, preview)`` is called after every block batch; raising from it cancels (the cache is freed).
    ``color_match``: ``"none"`` (reference) or ``"wavelet"`` (keep the input's low frequencies).
    """
    lr = _check_input(lr)
    if color_match not in ("none", "wavelet"):
        raise ValueError(f"color_match must be none or wavelet, got {color_match!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    config = model.config
    device = model.device
    factors = passes_for_scale(int(scale), config.native_scale)
    if noise is not None and len(factors) > 1:
        raise ValueError("noise= can only be given for a single pass (scale 2 or 4)")
    if isinstance(offload_cache, bool):
        offload_cache = "on" if offload_cache else "off"
    if clip_embedding is None and model.clip is None:
        raise ValueError("this Inf-DiT model has no CLIP image tower: load the release checkpoint that contains "
                         "image_encoder.model.visual.*, pass clip= to load_infdit, or give clip_embedding=")
    free = free_bytes if free_bytes is not None else (device_free_bytes(device) if block_batch == "auto" else None)

    # plan every pass first so progress knows the total work
    plans = []
    h, w = lr.shape[-2:]
    for f in factors:
        bb = block_batch if isinstance(block_batch, str) or isinstance(block_batch, int) else max(block_batch)
        plan = plan_upscale(config, h, w, f, free, block_batch=bb, offload_cache=offload_cache,
                            dtype=model.dtype, weights_resident=True)
        n = plan.block_batch if not isinstance(block_batch, tuple) else tuple(block_batch)
        plans.append((f, h, w, n, plan))
        if max(h * f, w * f) > config.max_side_px:
            warnings.warn(f"the output side {max(h * f, w * f)} px exceeds {config.max_side_px} px: RoPE "
                          "positions wrap around (as in the reference); expect repeated structure",
                          RopeWrapWarning, stacklevel=2)
        h, w = h * f, w * f
    evals = model_evaluations(steps)
    total = lr.shape[0] * evals * sum(p.batches_per_step for *_, p in plans)
    done = [0]

    generator = torch.Generator("cpu").manual_seed(int(seed))
    results = []
    for index in range(lr.shape[0]):
        image = lr[index:index + 1].to(device=device, dtype=torch.float32)
        rgb, alpha = image[:, :3], image[:, 3:]

        for pass_index, (f, h, w, n, plan) in enumerate(plans):
            ph, pw = padded_input(h, f, config), padded_input(w, f, config)
            padded = reflect_pad(rgb, ph, pw)
            height, width = ph * f, pw * f
            concat_lr = upsample_lr(padded, height, width)
            if f == config.native_scale:
                cond_lr, clip_source = padded, rgb
            else:  # the 2x trick
                native_h, native_w = height // config.native_scale, width // config.native_scale
                cond_lr = F.interpolate(padded, size=(native_h, native_w), mode="bicubic", align_corners=False,
                                        antialias=True)
                clip_source = F.interpolate(rgb, size=(h // 2, w // 2), mode="bicubic", align_corners=False,
                                            antialias=True)
            if clip_embedding is not None:
                emb = clip_embedding[index:index + 1] if clip_embedding.shape[0] > 1 else clip_embedding
            else:
                emb = model.clip.embed(clip_source)
            if noise is not None:
                if tuple(noise.shape[-2:]) != (height, width):
                    raise ValueError(f"noise must be (B, 3, {height}, {width}) for this input, "
                                     f"got {tuple(noise.shape)}")
                eps = noise[index:index + 1] if noise.shape[0] > 1 else noise
            else:
                eps = torch.randn((1, 3, height, width), generator=generator, dtype=torch.float32)
            eps = eps.to(device=device, dtype=torch.float32)
            pool = _preview_pool(height, width, config.block_px)
            preview = ((concat_lr[0] + 1) / 2).clamp(0, 1)
            preview = (F.avg_pool2d(preview[None], pool)[0] if pool > 1 else preview).cpu()

            def report(pv: torch.Tensor | None) -> None:
                done[0] += 1
                if progress is not None:
                    progress(done[0], max(total, done[0]), pv)

            out = sample_canvas(model, cond_lr, concat_lr=concat_lr, clip_embedding=emb, noise=eps, steps=steps,
                                block_batch=n, offload_cache=plan.offload_cache, report=report, is_oom=is_oom,
                                preview=preview if progress is not None else None, pool=pool)
            out = out[:, :, :h * f, :w * f]
            if color_match == "wavelet":
                out = wavelet_color_match(out, rgb)
            # a chained pass reads an image, as the reference would after saving; the last pass is
            # returned unclipped like the reference's sample() (clipping happens when it is saved)
            rgb = out.clamp(-1, 1) if pass_index < len(plans) - 1 else out
        if alpha.shape[1]:
            alpha = F.interpolate(alpha, size=rgb.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
            rgb = torch.cat([rgb, alpha], dim=1)
        results.append(rgb.to(lr.device))

    return torch.cat(results, dim=0)


__all__ = ["upscale", "sample_canvas", "wavelet_color_match", "reflect_pad", "RopeWrapWarning"]
