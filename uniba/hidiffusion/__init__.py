"""HiDiffusion (arXiv 2311.17528): RAU-Net and MSW-MSA for SD1.x/SD2.x/SDXL UNets, host-free.

* :mod:`.plan` - the reference's tables (blocks, T1/T2 ratios, SDXL aggressive mode) -> a per-run plan
* :mod:`.schedule` - the step a UNet call belongs to, from the sampler's sigmas (stateless)
* :mod:`.windows` - MSW-MSA window partition/reverse and the seeded shift choice
* :mod:`.raunet` - the RAD (dilated stride-4 conv), the pool/bicubic pair, ControlNet residual sizes
* :mod:`.detect` - SD1/SD2/SDXL/Turbo from plain facts about a UNet; refusals for the rest
* :mod:`.patch` - the hooks (plain callables over ComfyUI's ``transformer_options``)
"""

from .detect import UNetFacts, UnsupportedModelError, detect
from .plan import HiDiffusionConfig, StepPlan, describe, make_config, resolve_plan
from .schedule import step_index

__all__ = ["HiDiffusionConfig", "StepPlan", "UNetFacts", "UnsupportedModelError", "describe", "detect",
           "make_config", "resolve_plan", "step_index"]
