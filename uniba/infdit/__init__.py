"""Inf-DiT (arXiv 2405.04312): torch-only re-implementation with UniBA block-wise inference.

Public API: :func:`load_infdit`, :class:`InfDiT` (``denoise``), :func:`upscale`, the planner
(:func:`plan_upscale`, :func:`release_config`, :func:`config_for_file`) and the EDM sampler.
"""

from .config import ClipVisionConfig, InfDiTConfig, infer_config, release_config
from .loader import convert_checkpoint, load_infdit
from .model import InfDiT
from .plan import UpscalePlan, config_for_file, plan_upscale
from .sampling import get_sigmas_karras, sample_heun_edm
from .upscale import RopeWrapWarning, upscale

__all__ = [
    "ClipVisionConfig", "InfDiT", "InfDiTConfig", "RopeWrapWarning", "UpscalePlan", "config_for_file",
    "convert_checkpoint", "get_sigmas_karras", "infer_config", "load_infdit", "plan_upscale", "release_config",
    "sample_heun_edm", "upscale",
]
