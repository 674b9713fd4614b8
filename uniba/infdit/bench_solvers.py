"""``python -m uniba bench infdit-solvers``: accuracy of fewer-evaluation samplers against a 200-step solution.

For each model, every candidate sampler starts from the same x_T = up(LR) + sigma_max * noise on the
reference's Karras schedule (sigma 40 -> 0.002, rho 7) and is compared with a 200-step EDM Heun
solution (399 evaluations) of the same ODE: relative L2 distance and largest absolute difference,
against the number of model evaluations. The reference's Heun 20 (39 evaluations) sets the bar;
the cheapest candidate at least as close on every model (both metrics) is the fast preset.

Models: the mid-size random config of ``bench infdit`` and, with ``--golden FILE``, a tiny model
stored with its LR image, CLIP vector and noise (the parity tests' tests/data/infdit_tiny_a.safetensors
in a source checkout). Both have random weights: a proxy for the release, whose trained denoiser is
smoother. The denoiser is the production :class:`~uniba.infdit.blockwise.BlockwiseDenoiser` (whole
canvas in one batch, which is exactly equal to any block batch).
"""

from __future__ import annotations

import argparse
import json

import torch

from ..publish import publish
from .bench import REFERENCE_STEPS, golden_problem, measure, mid_problem
from .sampling import FAST_PRESET, REFERENCE_PRESET, SAMPLERS, count_evaluations, get_sigmas_karras

CANDIDATES = ([("heun", 20), ("heun", 10)] + [("euler", n) for n in (8, 10, 12, 15, 20)]
              + [("dpmpp_2m", n) for n in (8, 10, 12, 15, 20)] + [("unipc_bh1", n) for n in (10, 15)]
              + [(name, n) for name in ("dpmpp_3m", "unipc") for n in (8, 10, 12, 14, 15, 16, 17, 18, 20)])


def cheapest_as_close_as_reference(rows: list[dict]) -> tuple[str, int] | None:
    """The candidate with the fewest evaluations that is at least as close as Heun 20 on every model."""
    models = {r["model"] for r in rows}
    bar = {r["model"]: r for r in rows if (r["sampler"], r["steps"]) == REFERENCE_PRESET}
    ok = []
    for key in {(r["sampler"], r["steps"]) for r in rows}:
        mine = [r for r in rows if (r["sampler"], r["steps"]) == key]
        if len(mine) == len(models) and all(r["rel_l2"] <= bar[r["model"]]["rel_l2"]
                                            and r["max_abs"] <= bar[r["model"]]["max_abs"] for r in mine):
            ok.append((mine[0]["evaluations"], sum(r["rel_l2"] for r in mine), key))
    return min(ok)[2] if ok else None


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench infdit-solvers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=128, help="output side of the mid-size problem (px)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1 on a shared CPU)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--golden", help="also measure this tiny model with golden.* LR image, vector and noise "
                                         "(tests/data/infdit_tiny_a.safetensors in a source checkout)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = [golden_problem(args.golden)] if args.golden else []
    problems.append(mid_problem(args.side))
    print(f"Inf-DiT solvers vs a {REFERENCE_STEPS}-step EDM Heun solution from the same noise (Karras schedule "
          f"40 -> 0.002, rho 7; fp32 CPU, {args.threads} thread(s)). Random weights: a proxy for the release.")
    rows = measure(problems, CANDIDATES)
    header = f"{'model':<28} {'sampler':<10} {'steps':>5} {'evals':>5} {'rel L2':>9} {'max abs':>9} {'vs Heun 20':>10}"
    print(header)
    print("-" * len(header))
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == label), key=lambda r: (r["evaluations"], r["sampler"]))
        bar = next(r for r in mine if (r["sampler"], r["steps"]) == REFERENCE_PRESET)
        for r in mine:
            closer = r["rel_l2"] <= bar["rel_l2"] and r["max_abs"] <= bar["max_abs"]
            print(f"{label:<28} {r['sampler']:<10} {r['steps']:>5} {r['evaluations']:>5} {r['rel_l2']:>9.2e} "
                  f"{r['max_abs']:>9.2e} {'as close' if closer else '':>10}")
    best = cheapest_as_close_as_reference(rows)
    ref_evals = count_evaluations(SAMPLERS[REFERENCE_PRESET[0]], get_sigmas_karras(REFERENCE_PRESET[1]))
    fast_evals = count_evaluations(SAMPLERS[FAST_PRESET[0]], get_sigmas_karras(FAST_PRESET[1]))
    if best is None:
        print("no candidate is as close as Heun 20 on every model")
    else:
        evals = count_evaluations(SAMPLERS[best[0]], get_sigmas_karras(best[1]))
        print(f"cheapest as close as Heun 20 ({ref_evals} evaluations) on every model: {best[0]} {best[1]} steps = "
              f"{evals} evaluations ({ref_evals / evals:.1f}x fewer)")
    print(f"shipped fast preset: {FAST_PRESET[0]} {FAST_PRESET[1]} steps = {fast_evals} evaluations"
          + ("" if best == FAST_PRESET else "  (differs from this run's choice: update FAST_PRESET?)"))
    if args.json:
        publish(args.json, lambda tmp: tmp.write_text(json.dumps(rows, indent=1)), overwrite=True)
    return 0
