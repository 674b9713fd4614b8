"""Inf-DiT (arXiv 2405.04312): torch-only re-implementation with UniBA block-wise inference.

Public API: :func:`load_infdit` (:func:`read_infdit_checkpoint` then :func:`build_infdit`), :class:`InfDiT`,
:class:`BlockwiseDenoiser`,
:func:`upscale` (runs an :class:`UpscalePlan`), the planner (:func:`plan_upscale`, the one builder of a
plan, from a :func:`resolve_sampling`; :func:`parse_block_batch`, :func:`release_config`,
:func:`config_for_file`) and k-diffusion-shaped samplers.
"""

from .blockwise import BlockwiseDenoiser
from .config import ClipVisionConfig, InfDiTConfig, infer_config, release_config
from .loader import InfDiTCheckpoint, build_infdit, convert_checkpoint, load_infdit, read_infdit_checkpoint
from .model import InfDiT
from .plan import PassPlan, PlanDoesNotFit, UpscalePlan, config_for_file, parse_block_batch, plan_upscale
from .sampling import (
                       SAMPLERS,
                       Sampling,
                       count_evaluations,
                       get_sigmas_karras,
                       resolve_sampling,
                       sample_dpmpp_2m,
                       sample_dpmpp_3m,
                       sample_euler,
                       sample_euler_ancestral,
                       sample_heun_edm,
                       sample_unipc,
)
from .upscale import RopeWrapWarning, SmallInputWarning, upscale

__all__ = [
    "SAMPLERS", "BlockwiseDenoiser", "ClipVisionConfig", "InfDiT", "InfDiTCheckpoint", "InfDiTConfig", "PassPlan",
    "PlanDoesNotFit", "RopeWrapWarning", "Sampling", "SmallInputWarning", "UpscalePlan", "config_for_file",
    "convert_checkpoint", "build_infdit", "count_evaluations", "get_sigmas_karras", "infer_config", "load_infdit",
    "read_infdit_checkpoint", "parse_block_batch", "plan_upscale", "release_config", "resolve_sampling",
    "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_euler", "sample_euler_ancestral", "sample_heun_edm",
    "sample_unipc", "upscale",
]
