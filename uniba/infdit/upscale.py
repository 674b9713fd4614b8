"""The public upscaler: any input size, 2x/4x/8x/16x, alpha, batches, block-wise sampling.

Per pass (docs/SOURCES.md, Inf-DiT §3): reflect-pad the input (right/bottom) to whole blocks, bicubic-upsample it
for the concatenated channels, embed it with CLIP, start from ``x_T = up(LR) + sigmas[0] * noise``
(noise from a CPU generator seeded by ``seed``, so results do not depend on the device or on the
block batch), run the sampler (default: the reference's 20 EDM Heun steps) whose every denoiser
call is computed block-wise, crop back.
Native 4x; 2x by the reference's trick (concatenate the 2x upsampling, but give CLIP and the LR
cross-attention the input downscaled by 2, so the network still sees a 4x relation); 8x = 4x then 2x,
16x = 4x then 4x.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..guards import check_choice, check_image, check_seed, check_whole_number, finite_denoiser
from ..memory import is_out_of_memory
from ..progress import ProgressFn, check_cancel
from .blockwise import BatchCallback, BlockwiseDenoiser
from .config import InfDiTConfig
from .model import BlockRect, InfDiT, upsample_lr
from .plan import SCALES, PassPlan, UpscalePlan, min_input_side
from .ranks import ACROSS, gather_bands, plan_ranks, sample_band
from .sampling import DEFAULT_STEPS, NoiseLeftWarning, Sampler, get_sigmas_karras, run_sampler, sample_heun_edm

log = logging.getLogger(__name__)

PREVIEW_MAX = 512


# Said to every user of a model without its CLIP image tower: CLI users pass --clip, node users
# convert once with the tower included (the loader node has no separate CLIP input).
NO_CLIP_TOWER = (
    "this Inf-DiT model has no CLIP image tower (image_encoder.model.visual.*). On the command line add "
    "--clip open_clip_pytorch_model.safetensors (laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K); in ComfyUI first run "
    "python -m uniba convert-infdit MODEL OUT.safetensors --clip open_clip_pytorch_model.safetensors and load "
    "OUT.safetensors. From Python: load_infdit(..., clip=...) or upscale(..., clip_embedding=...).")


class RopeWrapWarning(UserWarning):
    """The output is larger than the RoPE table: positions wrap around, as in the reference."""


class SmallInputWarning(UserWarning):
    """The input is smaller than one block: it is padded, upscaled and cropped back."""


def reflect_pad(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad right/bottom by reflection (repeated when the pad exceeds the image), so content stays at (0, 0).

    A side of one pixel cannot be reflected: it is replicated instead.
    """
    if image.shape[-2] == 1 and height > 1:
        image = F.pad(image, (0, 0, 0, height - 1), mode="replicate")
    if image.shape[-1] == 1 and width > 1:
        image = F.pad(image, (0, width - 1, 0, 0), mode="replicate")
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


def sample_canvas(model: InfDiT, lr: torch.Tensor, *, concat_lr: torch.Tensor | None = None,
                  clip_embedding: torch.Tensor, noise: torch.Tensor, steps: int = DEFAULT_STEPS,
                  sampler: Sampler | None = None, sigmas: torch.Tensor | None = None, seed: int = 0,
                  block_batch: tuple[int, int] | int | None = None, offload_cache: bool = False,
                  on_batch: BatchCallback | None = None,
                  is_oom: Callable[[BaseException], bool] = is_out_of_memory,
                  between_layers: Callable[[], None] | None = None, keep_lr_maps: bool = True) -> torch.Tensor:
    """The reference's ``sample`` on a whole-block canvas: ``x_T = up(lr) + sigmas[0] * noise``, then the
    sampler (default EDM Heun on the reference's Karras schedule) over the block-wise denoiser (float32).

    ``seed`` seeds the CPU noise of ancestral/SDE samplers (not the initial noise, which is ``noise``).
    The sampler's canvases live where ``noise`` is (the host when they do not fit the device).
    """
    sampler = sample_heun_edm if sampler is None else sampler
    sigmas = get_sigmas_karras(steps) if sigmas is None else sigmas
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    denoiser = BlockwiseDenoiser(model, lr, clip_embedding, canvas=tuple(noise.shape[-2:]), concat_lr=concat_lr,
                                 block_batch=block_batch, offload_cache=offload_cache, on_batch=on_batch,
                                 is_oom=is_oom, between_layers=between_layers, keep_lr_maps=keep_lr_maps,
                                 state_device=noise.device)
    x = denoiser.concat_lr.float() + sigmas[0] * noise.float()
    # a step that produces NaN/inf stops here, named, instead of ending as a black image
    return run_sampler(sampler, finite_denoiser(denoiser, sigmas, "the Inf-DiT sampler"), x, sigmas, seed=seed,
                       block_px=model.config.block_px)


def _preview_pool(height: int, width: int, block_px: int) -> int:
    pool = 1
    while max(height, width) / pool > PREVIEW_MAX and pool < block_px:
        pool *= 2
    return pool


class _Progress:
    """Counts finished block batches over every evaluation, pass and image; keeps the pass's preview."""

    def __init__(self, progress: ProgressFn | None, total: int, block_px: int) -> None:
        self.progress, self.total, self.block_px = progress, total, block_px
        self.done = 0
        self.preview: torch.Tensor | None = None
        self.pool = 1

    def start_pass(self, concat_lr: torch.Tensor) -> None:
        """The preview starts as the upsampled LR and fills in block by block with the denoised image."""
        if self.progress is None:
            return
        self.pool = _preview_pool(*concat_lr.shape[-2:], self.block_px)
        preview = ((concat_lr[0] + 1) / 2).clamp(0, 1)
        self.preview = (F.avg_pool2d(preview[None], self.pool)[0] if self.pool > 1 else preview).cpu()

    def on_batch(self, rect: BlockRect, denoised: torch.Tensor) -> None:
        if self.progress is None:
            return
        self.done += 1
        small = F.avg_pool2d(denoised[:1], self.pool) if self.pool > 1 else denoised[:1]
        p = self.block_px // self.pool
        self.preview[:, rect.row0 * p:rect.row1 * p, rect.col0 * p:rect.col1 * p] = \
            ((small[0] + 1) / 2).clamp(0, 1).cpu()
        self.progress(self.done, max(self.total, self.done), self.preview)


def _check_input(lr: torch.Tensor) -> torch.Tensor:
    return check_image(lr, "lr (the input image)", channels_last=False, value_range=(-1.0, 1.0),
                       fix_range="Pass image / 127.5 - 1 for 0..255 pixels, image * 2 - 1 for 0..1 pixels.")


def check_upscale_arguments(scale: object, seed: object, steps: object) -> tuple[int, int, int]:
    """``scale``, ``seed`` and ``steps`` of :func:`upscale` as numbers, or one sentence naming the bad one."""
    return (check_choice(scale, SCALES, "scale"), check_seed(seed, "seed"), check_whole_number(steps, "steps"))


def _check_plan(plan: UpscalePlan, lr: torch.Tensor, config: InfDiTConfig) -> None:
    if not isinstance(plan, UpscalePlan):
        raise TypeError(f"plan must be an UpscalePlan from uniba.infdit.plan_upscale, got {type(plan).__name__}")
    first = plan.passes[0]
    if (first.in_height, first.in_width) != tuple(lr.shape[-2:]) or plan.block_px != config.block_px:
        raise ValueError(f"the plan is for a {first.in_width}x{first.in_height} input with {plan.block_px}-px "
                         f"blocks, not for this {lr.shape[-1]}x{lr.shape[-2]} input with {config.block_px}-px "
                         "blocks: plan it for this image and model")


def _pass_inputs(model: InfDiT, rgb: torch.Tensor, p: PassPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LR the network conditions on, upsampled LR of the concatenated channels, image CLIP embeds)."""
    config = model.config
    f, h, w = p.scale, p.in_height, p.in_width
    padded = reflect_pad(rgb, p.padded_height, p.padded_width)
    height, width = p.canvas_height, p.canvas_width
    concat_lr = upsample_lr(padded, height, width)
    if f == config.native_scale:
        return padded, concat_lr, rgb
    # the 2x trick: concatenate the 2x upsampling, but give CLIP and the LR cross-attention the
    # input downscaled by 2, so the network still sees a 4x relation
    native = (height // config.native_scale, width // config.native_scale)
    cond_lr = F.interpolate(padded, size=native, mode="bicubic", align_corners=False, antialias=True)
    clip_source = F.interpolate(rgb, size=(max(1, h // 2), max(1, w // 2)), mode="bicubic", align_corners=False,
                                antialias=True)
    return cond_lr, concat_lr, clip_source


def _noise_seed(seed: int, image: int, pass_index: int) -> int:
    """The seed of an ancestral sampler's step noise: its own stream per image and pass, apart from x_T's."""
    return (int(seed) * 1_000_003 + image * 10_007 + pass_index * 101 + 0x5EED) % (2**63)


@torch.no_grad()
def upscale(model: InfDiT, lr: torch.Tensor, plan: UpscalePlan, *, seed: int = 0, noise: torch.Tensor | None = None,
            clip_embedding: torch.Tensor | None = None, progress: ProgressFn | None = None, color_match: str = "none",
            is_oom: Callable[[BaseException], bool] = is_out_of_memory, group: Any = None, split: str = ACROSS,
            band_sizes: list[int] | None = None) -> torch.Tensor:
    """Upscale ``lr`` (B, 3 or 4, h, w) in [-1, 1] as ``plan`` says, to (B, C, h*scale, w*scale).

    ``plan``: the :class:`~uniba.infdit.plan.UpscalePlan` of this input and model, from
    :func:`~uniba.infdit.plan.plan_upscale`: its passes, block batches and cache placement, and its
    sampling (any k-diffusion sampler ``sample_x(model, x, sigmas, extra_args, callback, disable)`` on
    its schedule) are run as they are. Ancestral/SDE samplers get CPU noise seeded from ``seed``.
    The result is not clipped (like the reference's ``sample()``): clip it to [-1, 1] when saving.

    ``noise`` (B, 3, H, W) on the padded canvas replaces the seeded x_T draw (single-pass scales only)
    and ``clip_embedding`` (B or 1, vector_dim) the CLIP tower's embedding, so results can be compared
    exactly with the reference. ``progress(done, total, preview)`` is called after every block batch;
    raising from it cancels (the cache is freed). ``color_match``: ``"none"`` (reference) or
    ``"wavelet"`` (keep the input's low frequencies). Inputs smaller than one block are padded and
    cropped back with a :class:`SmallInputWarning`.
    ``group``: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` under
    torchrun): every rank of it calls ``upscale`` with the same arguments, each samples one band of
    every pass (:mod:`uniba.infdit.ranks`; ``split`` and ``band_sizes`` choose the bands) and every
    rank returns the whole image, equal to the one-process result.
    """
    lr = _check_input(lr)
    seed = check_seed(seed, "seed")
    config, device = model.config, model.device
    _check_plan(plan, lr, config)
    if color_match not in ("none", "wavelet"):
        raise ValueError(f"color_match must be none or wavelet, got {color_match!r}")
    if noise is not None and len(plan.passes) > 1:
        raise ValueError("noise= can only be given for a single pass (scale 2 or 4)")
    if clip_embedding is None and model.clip is None:
        raise ValueError(NO_CLIP_TOWER)
    _warn_about_sizes(plan, config, lr.shape[-2:])
    sampler, sigmas = plan.sampling.sampler, plan.sampling.sigmas
    total = plan.total_batches
    if group is not None:
        ranks_plan = plan_ranks(plan, config, dist.get_world_size(group), split=split, sizes=band_sizes,
                                dtype=model.dtype)
        total = ranks_plan.batches(dist.get_rank(group), plan)

    ticker = _Progress(progress, lr.shape[0] * total, config.block_px)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    results = []
    for index in range(lr.shape[0]):
        image = lr[index:index + 1].to(device=device, dtype=torch.float32)
        rgb, alpha = image[:, :3], image[:, 3:]
        for pass_index, p in enumerate(plan.passes):
            # the canvases (x_T, the upsampled LR, the sampler's state) live where the plan says
            state = torch.device("cpu") if p.state_on_host else device
            # split across ranks, the whole-canvas inputs stay on the host: each rank moves only its band
            rgb = rgb.to(state if group is None else torch.device("cpu"))
            cond_lr, concat_lr, clip_source = _pass_inputs(model, rgb, p)
            if clip_embedding is not None:
                emb = clip_embedding[index:index + 1] if clip_embedding.shape[0] > 1 else clip_embedding
            else:
                emb = model.clip.embed(clip_source.to(device))
            canvas = (p.canvas_height, p.canvas_width)
            if noise is not None:
                if tuple(noise.shape[-2:]) != canvas:
                    raise ValueError(f"noise must be (B, 3, {canvas[0]}, {canvas[1]}) for this input, "
                                     f"got {tuple(noise.shape)}")
                eps = noise[index:index + 1] if noise.shape[0] > 1 else noise
            else:
                eps = torch.randn((1, 3, *canvas), generator=generator, dtype=torch.float32)
            ticker.start_pass(concat_lr)
            if group is None:
                out = sample_canvas(model, cond_lr, concat_lr=concat_lr, clip_embedding=emb,
                                    noise=eps.to(device=state, dtype=torch.float32), sampler=sampler, sigmas=sigmas,
                                    seed=_noise_seed(seed, index, pass_index), block_batch=p.block_batch,
                                    offload_cache=p.offload_cache, on_batch=ticker.on_batch, is_oom=is_oom,
                                    between_layers=lambda: check_cancel(progress), keep_lr_maps=p.keep_lr_maps)
            else:
                split_pass = ranks_plan.passes[pass_index]
                band = sample_band(model, cond_lr, concat_lr=concat_lr, clip_embedding=emb,
                                   noise=eps, state_device=state, sampler=sampler, sigmas=sigmas,
                                   seed=_noise_seed(seed, index, pass_index), bands=list(split_pass.bands),
                                   axis=split_pass.axis, group=group, block_batch=split_pass.block_batch,
                                   offload_cache=p.offload_cache, on_batch=ticker.on_batch, is_oom=is_oom,
                                   between_layers=lambda: check_cancel(progress), keep_lr_maps=p.keep_lr_maps)
                out = gather_bands(band, list(split_pass.bands), config.block_px, canvas, 1, group, rgb.device)
            out = out[:, :, :p.out_height, :p.out_width]
            if color_match == "wavelet":
                out = wavelet_color_match(out, rgb)
            # a chained pass reads an image, as the reference would after saving; the last pass is
            # returned unclipped like the reference's sample() (clipping happens when it is saved)
            rgb = out.clamp(-1, 1) if pass_index < len(plan.passes) - 1 else out
        if alpha.shape[1]:
            alpha = F.interpolate(alpha.to(rgb.device), size=rgb.shape[-2:], mode="bicubic",
                                  align_corners=False).clamp(-1, 1)
            rgb = torch.cat([rgb, alpha], dim=1)
        results.append(rgb.to(lr.device))
    return torch.cat(results, dim=0)


def _warn_about_sizes(plan: UpscalePlan, config, lr_size: tuple[int, int]) -> None:
    first = plan.passes[0]
    smallest = min_input_side(config, first.scale)
    if min(lr_size) < smallest:
        warnings.warn(f"the input is {lr_size[1]}x{lr_size[0]} px, smaller than one {config.block_px}-px block at "
                      f"{first.scale}x ({smallest} px): it is padded to {first.padded_width}x"
                      f"{first.padded_height} and the output cropped back; expect weaker detail",
                      SmallInputWarning, stacklevel=3)
    if plan.rope_wraps:
        warnings.warn(f"the output side {max(plan.out_height, plan.out_width)} px exceeds {config.max_side_px} px: "
                      "RoPE positions wrap around (as in the reference); expect repeated structure",
                      RopeWrapWarning, stacklevel=3)


__all__ = ["upscale", "sample_canvas", "wavelet_color_match", "reflect_pad", "RopeWrapWarning", "SmallInputWarning",
           "NoiseLeftWarning", "check_upscale_arguments"]
