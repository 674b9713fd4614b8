"""What fits on a card: per model and card size, which weight dtypes fit, their peak and what is offloaded.

``python -m uniba fit [--card 12]``. Every figure comes from the engine's own planners, no weights needed:

* weights: the parameters of each release built on the meta device at its released shapes, times the
  dtype's size (the same bytes ``python -m uniba bench load`` measures on the release-size files);
* Inf-DiT: :func:`uniba.infdit.plan.plan_upscale` for a 1024 -> 4096 px upscale (block batch, KV cache in RAM
  or not, as the node plans it);
* Sana: :func:`uniba.sana.checks.sana_sampling_peak_bytes` (CFG batch of 2, the measured per-token forward peak);
* Gemma-2: the encoding's working memory the node requests (:data:`uniba.sana.text_encoder.ENCODE_WORK_BYTES`);
* DC-AE: :func:`uniba.dcae.tiling.plan_pass`, the tile plan of a 4096 px decode within the card.

A card of N GB is taken as N GiB free, with the planners' 10 % margin. Each stage runs alone: ComfyUI moves
the models of other stages to RAM (Gemma-2 before the DiT samples, the DiT before the DC-AE decodes).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache

import torch

from .cli_io import positive_int
from .dcae.config import DCAEConfig
from .dcae.model import DCAE
from .dcae.tiling import decoder_steps, plan_pass
from .devices import STORAGE_DTYPES
from .infdit.config import release_config
from .infdit.model import InfDiT
from .infdit.plan import plan_upscale
from .memory import Budget, format_bytes
from .sana.checks import sana_sampling_peak_bytes
from .sana.config import LATENT_DOWNSCALE, RELEASES
from .sana.model import SanaDiT
from .sana.text_encoder import ENCODE_WORK_BYTES

CARDS_GB = (8, 12, 16, 24)
SAFETY_FRACTION = 0.1
GIB = 1024**3


@dataclass(frozen=True)
class Fit:
    """One model in one dtype on one card."""

    dtype: str
    peak_bytes: int
    weights_bytes: int
    fits: bool
    offloaded: str = ""  # what the plan keeps in host RAM


@dataclass(frozen=True)
class Work:
    name: str
    dtypes: tuple[str, ...]

    def fit(self, dtype: str, card_bytes: int) -> Fit:
        raise NotImplementedError

    def least_bytes(self, dtype: str) -> int:
        """The smallest plan's peak (weights included): what the card must have free, less the margin."""
        return self.fit(dtype, 0).peak_bytes


@cache
def _params(kind: str, name: str = "") -> int:
    """Parameter count of a release, built on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        if kind == "infdit":
            model = InfDiT(release_config())
        elif kind == "sana":
            model = SanaDiT(RELEASES[name])
        elif kind == "gemma":
            return _gemma_params(**GEMMA_2_2B)
        else:
            model = DCAE(DCAEConfig.sana_f32c32())
    return sum(p.numel() for p in model.parameters())


# gemma-2-2b's config.json (counted by hand: building it through transformers takes seconds).
GEMMA_2_2B = {"vocab": 256000, "hidden": 2304, "layers": 26, "heads": 8, "kv_heads": 4, "head_dim": 256,
              "intermediate": 9216}


def _gemma_params(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                  intermediate: int) -> int:
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    per_layer = attention + 3 * hidden * intermediate + 4 * hidden  # gate, up, down; four RMSNorms
    return vocab * hidden + layers * per_layer + hidden  # embeddings, layers, final norm


def _size(dtype: str) -> int:
    return torch.empty((), dtype=STORAGE_DTYPES[dtype]).element_size()


def _usable(card_bytes: int, weights: int) -> int:
    return Budget(card_bytes, SAFETY_FRACTION, weights).usable


class InfDiTWork(Work):
    def fit(self, dtype: str, card_bytes: int) -> Fit:
        plan = plan_upscale(release_config(), 1024, 1024, 4, card_bytes, dtype=STORAGE_DTYPES[dtype])
        return Fit(dtype, plan.peak_bytes, plan.weights_bytes, plan.fits,
                   "KV cache" if any(p.offload_cache for p in plan.passes) else "")

    def least_bytes(self, dtype: str) -> int:
        return plan_upscale(release_config(), 1024, 1024, 4, None, dtype=STORAGE_DTYPES[dtype]).minimum_bytes


@dataclass(frozen=True)
class SanaWork(Work):
    release: str = ""
    side: int = 1024

    def fit(self, dtype: str, card_bytes: int) -> Fit:
        weights = _params("sana", self.release) * _size(dtype)
        latent = self.side // LATENT_DOWNSCALE
        work = sana_sampling_peak_bytes(1, latent, latent, hidden_size=RELEASES[self.release].hidden_size)
        return Fit(dtype, weights + work, weights, work <= _usable(card_bytes, weights))


class GemmaWork(Work):
    def fit(self, dtype: str, card_bytes: int) -> Fit:
        weights = _params("gemma") * _size(dtype)
        return Fit(dtype, weights + ENCODE_WORK_BYTES, weights, ENCODE_WORK_BYTES <= _usable(card_bytes, weights))


@dataclass(frozen=True)
class DCAEWork(Work):
    side: int = 4096

    def fit(self, dtype: str, card_bytes: int) -> Fit:
        weights = _params("dcae") * _size(dtype)
        usable = _usable(card_bytes, weights)
        with torch.device("meta"):
            steps = decoder_steps(DCAE(DCAEConfig.sana_f32c32()))
        cells = self.side // LATENT_DOWNSCALE
        plan = plan_pass(steps, (1, 32, cells, cells), STORAGE_DTYPES[dtype], budget_bytes=usable)
        offloaded = "" if plan.store_on_compute else "whole activations"
        return Fit(dtype, weights + plan.estimated_peak_bytes, weights, plan.estimated_peak_bytes <= usable, offloaded)

    def least_bytes(self, dtype: str) -> int:
        return self.fit(dtype, 1).peak_bytes  # a 1-byte budget: the smallest tiles


WORKS: tuple[Work, ...] = (
    InfDiTWork("Inf-DiT, 4x 1024 -> 4096 px", ("bf16", "fp32")),
    SanaWork("Sana 0.6B, 1024 px", ("bf16", "fp32"), "Sana_600M_1024px", 1024),
    SanaWork("Sana 1.6B, 1024 px", ("bf16", "fp32"), "Sana_1600M_1024px", 1024),
    SanaWork("Sana 1.6B 4K, 4096 px", ("bf16", "fp32"), "Sana_1600M_4Kpx", 4096),
    SanaWork("Sana 1.5 4.8B, 1024 px", ("fp8_e4m3fn", "bf16", "fp32"), "SANA1.5_4.8B_1024px", 1024),
    GemmaWork("Gemma-2-2B text encoder, one prompt", ("bf16", "fp32")),
    DCAEWork("DC-AE decode, 4096 px", ("bf16", "fp32")),
)


# One SANA-1.5 4.8B text-to-image run, step by step: (step, its work, the dtypes offered for it).
SANA_4800M_PIPELINE: tuple[tuple[str, Work, tuple[str, ...]], ...] = (
    ("1 Gemma-2 encodes", GemmaWork("Gemma-2-2B", ("bf16",)), ("bf16",)),
    ("2 DiT samples", SanaWork("Sana 1.5 4.8B", ("fp8_e4m3fn", "bf16"), "SANA1.5_4.8B_1024px", 1024),
     ("fp8_e4m3fn", "bf16")),
    ("3 DC-AE decodes", DCAEWork("DC-AE 1024 px", ("bf16",), 1024), ("bf16",)),
)


def residency_table(pipeline: tuple[tuple[str, Work, tuple[str, ...]], ...] = SANA_4800M_PIPELINE,
                    cards: tuple[int, ...] = (12, 16)) -> str:
    """What is on the card at each step of a pipeline, per card and DiT weight dtype (planned, no weights needed).

    Each step runs alone: the models of the other steps wait in RAM (ComfyUI unloads them when the next one needs
    the room), so a step's peak is its own weights plus its working memory.
    """
    dit_dtypes = max((dtypes for _, _, dtypes in pipeline), key=len)
    lines = ["Resident on the card per step, 1024 px SANA-1.5 4.8B (planned from byte counts; other steps' models "
             "in RAM):", "| card | DiT weights | " + " | ".join(step for step, _, _ in pipeline) + " |",
             "|---|---|" + "---|" * len(pipeline)]
    for card in cards:
        for dit_dtype in dit_dtypes:
            cells = []
            for _, work, dtypes in pipeline:
                dtype = dit_dtype if dit_dtype in dtypes else dtypes[0]
                f = work.fit(dtype, card * GIB)
                text = f"{dtype} {_gib(f.weights_bytes)} + {_gib(f.peak_bytes - f.weights_bytes)} work"
                cells.append(text + ("" if f.fits else " DOES NOT FIT") + (f", {f.offloaded} in RAM" if f.offloaded
                                                                             else ""))
            lines.append(f"| {card} GB | {dit_dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def cell(work: Work, card_gb: int) -> str:
    """The dtypes that fit (peak in GiB, what stays in RAM), or what the smallest needs."""
    fits = [work.fit(d, card_gb * GIB) for d in work.dtypes]
    shown = []
    for f in fits:
        if not f.fits:
            continue
        text = f"{f.dtype} {_gib(f.peak_bytes)}"
        shown.append(text + (f", {f.offloaded} in RAM" if f.offloaded else ""))
    if shown:
        return "; ".join(shown)
    smallest = min(fits, key=lambda f: f.peak_bytes)
    return f"no ({smallest.dtype} needs {_gib(smallest.peak_bytes)})"


def markdown(cards: tuple[int, ...] = CARDS_GB) -> str:
    """The fit table as Markdown: one row per model, one column per card; cells: dtype and peak GiB."""
    lines = ["| model, work | smallest plan, bf16 | " + " | ".join(f"{c} GB" for c in cards) + " |",
             "|---|---|" + "---|" * len(cards)]
    for work in WORKS:
        lines.append(f"| {work.name} | {_gib(work.least_bytes('bf16'))} | "
                     + " | ".join(cell(work, c) for c in cards) + " |")
    return "\n".join(lines)


def run_cards(cards: tuple[int, ...] = CARDS_GB, weights: bool = False) -> int:
    """Print the fit table for ``cards`` (GB), and each model's weight bytes per dtype with ``weights``."""
    print(markdown(cards))
    if weights:
        print()
        for work in WORKS:
            sizes = ", ".join(f"{d} {format_bytes(work.fit(d, GIB).weights_bytes)}" for d in work.dtypes)
            print(f"{work.name}: weights {sizes}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_cards(tuple(args.card) if args.card else CARDS_GB, args.weights)


def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit", help="what fits on a card: dtype, peak GiB, what stays in RAM, per model (no weights needed)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("--card", type=positive_int, action="append", metavar="GB",
                     help="card size in GB (repeatable); default: 8, 12, 16 and 24")
    fit.add_argument("--weights", action="store_true", help="also list each model's weight bytes per dtype")
    fit.set_defaults(func=_run)

    # `plan --card N` asks the same question as `fit --card N`: the plan command (registered by uniba.infdit.cli,
    # which must not import this module) gets the option here and hands the card question to the one table.
    plan = subparsers.choices.get("plan")
    if plan is not None:
        plan.add_argument("--card", type=positive_int, action="append", metavar="GB",
                          help="without a target: what fits on a card of this many GB, per model (= uniba fit)")
        upscale_plan = plan.get_default("func")

        def plan_or_cards(args: argparse.Namespace) -> int:
            if args.target is None and args.card:
                return run_cards(tuple(args.card))
            return upscale_plan(args)

        plan.set_defaults(func=plan_or_cards)
