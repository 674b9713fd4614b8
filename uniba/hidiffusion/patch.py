"""The HiDiffusion hooks, as plain callables over ComfyUI's ``transformer_options`` dicts (no host imports).

Each hook is a small object holding only the frozen :class:`HiDiffusionConfig` (plus, for the
fallback, a few floats), so ``ModelPatcher.clone()``'s deep copy of ``model_options`` is cheap
and never copies a model. Every call recomputes its step from the sigmas it is given: no counters,
no global state, nothing to reset after an interrupted run.

Hook points (ComfyUI ``UNetModel``):

======================  ==================================  =====================================
part                    ComfyUI hook                        what it does
======================  ==================================  =====================================
RAD                     forward_timestep_embed_patch        ``Downsample`` at ``("input", rad)``
                        (Downsample)                        runs as a dilated stride-4 conv
CA pool                 input_block_patch (_after_skip)     avg-pool after ``("input", ca)``
CA restore              output_block_patch                  bicubic ``h`` to the skip size
MSW-MSA                 attn1_patch + attn1_output_patch    2x2 shifted windows on the top level
ControlNet              DIFFUSION_MODEL wrapper             residuals resized to the patched sizes
plan log                OUTER_SAMPLE wrapper                one log line per sampling run
======================  ==================================  =====================================
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from . import raunet, windows
from .plan import HiDiffusionConfig, StepPlan, describe, resolve_plan
from .schedule import current_sigma, step_from_percent, step_index

log = logging.getLogger("uniba.hidiffusion")

WINDOW_STATE_KEY = "uniba_hidiffusion_windows"
WRAPPER_KEY = "uniba_hidiffusion"
FALLBACK_STEPS = 100


@functools.lru_cache(maxsize=256)
def _plan(config: HiDiffusionConfig, latent_h: int, latent_w: int, num_steps: int) -> StepPlan:
    return resolve_plan(config, latent_h, latent_w, num_steps)


class _Hook:
    """Shared by all hooks: which step a call is, and the plan for the run it belongs to."""

    uniba_hidiffusion = True  # marks our hooks, so a second HiDiffusion patch replaces them

    def __init__(self, config: HiDiffusionConfig, percent_sigmas: Sequence[float] | None = None) -> None:
        self.config = config
        # sigma at percent k/FALLBACK_STEPS, used only when the sampler gives no sigma schedule
        self.percent_sigmas = tuple(percent_sigmas) if percent_sigmas is not None else None
        self._warned = False
        # identity memo: every hook call of one UNet forward sees the same sigma tensors, so the
        # host->device sync of reading them happens once per forward, not once per block
        self._memo: tuple | None = None

    def step_and_plan(self, options: dict[str, Any]) -> tuple[int, StepPlan] | None:
        sigma = options.get("sigmas")
        shape = options.get("original_shape")
        if sigma is None or shape is None:
            return None
        sample_sigmas = options.get("sample_sigmas")
        if sample_sigmas is not None and len(sample_sigmas) >= 2:
            memo = self._memo
            if memo is not None and memo[0] is sigma and memo[1] is sample_sigmas:
                step, num_steps = memo[2]
            else:
                step, num_steps = step_index(sigma, sample_sigmas)
                self._memo = (sigma, sample_sigmas, (step, num_steps))
        elif self.percent_sigmas is not None:
            if not self._warned:
                log.warning("HiDiffusion: the sampler passed no sigma schedule; thresholds apply to "
                            "the percent of denoising instead of the step count.")
                self._warned = True
            num_steps = FALLBACK_STEPS
            step = step_from_percent(current_sigma(sigma), self.percent_sigmas, num_steps)
        else:
            return None
        return step, _plan(self.config, int(shape[-2]), int(shape[-1]), num_steps)


class DownsampleHandler(_Hook):
    """``forward_timestep_embed_patch`` handler for ``Downsample``: the RAD on its block and steps."""

    def __call__(self, layer, x, emb, context, transformer_options, output_shape=None, time_context=None,
                 num_video_frames=None, image_only_indicator=None):
        if self.config.raunet and transformer_options.get("block") == ("input", self.config.rad):
            resolved = self.step_and_plan(transformer_options)
            op = getattr(layer, "op", None)
            if resolved is not None and resolved[1].rad_active(resolved[0]) and isinstance(op, torch.nn.Conv2d):
                return raunet.dilated_downsample(op, x)
        return self._next(layer, x, emb, context, transformer_options, output_shape, time_context,
                          num_video_frames, image_only_indicator)

    def _next(self, layer, x, *args):
        """Hand the layer to the next handler registered for its class (another pack), else run it."""
        handlers = transformer_options_handlers(args[2])
        seen = False
        for class_type, handler in handlers:
            if handler is self:
                seen = True
            elif seen and isinstance(layer, class_type):
                return handler(layer, x, *args)
        return layer(x)


def transformer_options_handlers(transformer_options: dict) -> list:
    return transformer_options.get("patches", {}).get("forward_timestep_embed_patch", [])


class PoolPatch(_Hook):
    """``input_block_patch`` (or ``_after_skip``): 2x2 ceil-mode average pool after the CA block."""

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if self.config.raunet and transformer_options.get("block") == ("input", self.config.ca):
            resolved = self.step_and_plan(transformer_options)
            if resolved is not None and resolved[1].ca_active(resolved[0]):
                return raunet.pool(h)
        return h


class RestorePatch(_Hook):
    """``output_block_patch``: resize ``h`` to the skip's size at the paired block (shape-driven)."""

    def __call__(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
        if (self.config.raunet and transformer_options.get("block") == ("output", self.config.ca_output)
                and h.shape[-2:] != hsp.shape[-2:]):
            h = raunet.restore(h, hsp.shape[-2:], self.config.upscale_mode)
        return h, hsp


class WindowPartitionPatch(_Hook):
    """``attn1_patch``: cut the self-attention input of the top-level blocks into 2x2 shifted windows."""

    def __call__(self, n: torch.Tensor, context_attn1, value_attn1, extra_options: dict):
        extra_options.pop(WINDOW_STATE_KEY, None)
        block = extra_options.get("block")
        if not self.config.msw_msa or block is None or (block[0], block[1]) not in self.config.layout.msw_blocks:
            return n, context_attn1, value_attn1
        hw = self._feature_size(n, extra_options)
        if hw is None:
            return n, context_attn1, value_attn1
        height, width = hw
        if (height % 2 or width % 2) and self.config.odd_window_mode == "skip":
            return n, context_attn1, value_attn1
        same_k = context_attn1 is None or context_attn1 is n
        same_v = value_attn1 is n
        if not ((same_k or context_attn1.shape == n.shape)
                and (same_v or value_attn1 is None or value_attn1.shape == n.shape)):
            return n, context_attn1, value_attn1  # another patch changed k/v tokens: leave global
        resolved = self.step_and_plan(extra_options)
        step = resolved[0] if resolved is not None else 0
        choice = windows.shift_choice(self.config.seed, step, (block[0], block[1]),
                                      int(extra_options.get("block_index", 0)))
        windowed, state = windows.partition(n, height, width, choice)
        k = windowed if same_k else windows.partition(context_attn1, height, width, choice)[0]
        if value_attn1 is None:
            v = None  # the attention then takes its values from k, as ComfyUI does
        elif same_v or value_attn1 is context_attn1:
            v = windowed if same_v else k
        else:
            v = windows.partition(value_attn1, height, width, choice)[0]
        extra_options[WINDOW_STATE_KEY] = state
        return windowed, k, v

    @staticmethod
    def _feature_size(n: torch.Tensor, extra_options: dict) -> tuple[int, int] | None:
        shape = extra_options.get("activations_shape")
        if shape is not None and int(shape[-2]) * int(shape[-1]) == n.shape[1]:
            return int(shape[-2]), int(shape[-1])
        original = extra_options.get("original_shape")
        if original is None:
            return None
        hw = windows.feature_size_from_tokens(int(original[-2]), int(original[-1]), n.shape[1])
        return hw if hw[0] * hw[1] == n.shape[1] else None


class WindowMergePatch(_Hook):
    """``attn1_output_patch``: put the windows back (inverse shift) before the residual add."""

    def __call__(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        state = extra_options.pop(WINDOW_STATE_KEY, None)
        if state is None:
            return n
        return windows.reverse(n, state)


class ControlNetWrapper(_Hook):
    """``DIFFUSION_MODEL`` wrapper: resize ControlNet residuals to the sizes the patched UNet has.

    ComfyUI adds the residuals before the input-block patches and, on a size mismatch, only logs a
    warning and drops the hint; resizing them first keeps the ControlNet effective.
    """

    def __init__(self, config: HiDiffusionConfig, percent_sigmas: Sequence[float] | None = None,
                 n_input_blocks: int = 12, downsample_blocks: Sequence[int] = (3, 6, 9)) -> None:
        super().__init__(config, percent_sigmas)
        self.n_input_blocks = n_input_blocks
        self.downsample_blocks = tuple(downsample_blocks)

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None,
                 **kwargs):
        if control and self.config.raunet and self.config.controlnet_resize and transformer_options is not None:
            options = dict(transformer_options)
            options.setdefault("original_shape", list(x.shape))
            resolved = self.step_and_plan(options)
            if resolved is not None:
                step, plan = resolved
                rad = self.config.rad if plan.rad_active(step) else None
                ca = self.config.ca if plan.ca_active(step) else None
                if rad is not None or ca is not None:
                    control = raunet.resize_control(
                        control, (x.shape[-2], x.shape[-1]), self.n_input_blocks, self.downsample_blocks,
                        rad_block=rad, ca_block=ca, ca_after_skip=self.config.ca_after_skip, mode="bicubic")
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class PlanLogger(_Hook):
    """``OUTER_SAMPLE`` wrapper: log the resolved plan once per sampling run."""

    def __call__(self, executor, *args, **kwargs):
        try:
            noise = args[0] if args else kwargs["noise"]
            sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
            plan = _plan(self.config, int(noise.shape[-2]), int(noise.shape[-1]), max(1, len(sigmas) - 1))
            log.info("HiDiffusion: %s", describe(self.config, plan))
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        return executor(*args, **kwargs)


def is_ours(obj: Any) -> bool:
    """True for the hooks above (even after ``deepcopy``), so re-patching replaces rather than stacks."""
    target = obj[1] if isinstance(obj, tuple) and len(obj) == 2 else obj
    return bool(getattr(target, "uniba_hidiffusion", False))
