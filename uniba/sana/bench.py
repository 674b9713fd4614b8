"""``python -m uniba bench sana``: linear vs softmax attention scaling; Flow-DPM-Solver vs Flow-Euler accuracy.

1. Forward time of a mid-size random Sana DiT at N and 4N latent tokens, with its ReLU linear
   attention and with softmax self-attention swapped in (same weights, same heads), measured
   interleaved in one run; the ratio 4N/N is what matters (linear must stay <= 4.6x).
2. On a tiny random model with CFG: distance of Flow-DPM-Solver (20 steps) and Flow-Euler
   (28 steps) to a 200-step solution of the same ODE.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .config import DEFAULT_SHIFT, SanaConfig
from .model import LinearAttention, SanaDiT
from .sampling import flow_sigmas, sample_flow_dpm_solver, sample_flow_euler

LINEAR_LIMIT = 4.6


def _softmax_attend(self: LinearAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, n, c = q.shape
    q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


def softmax_twin(model: SanaDiT) -> SanaDiT:
    """The same model (shared weights) with softmax self-attention in every block."""
    twin = SanaDiT(model.config, device="meta")
    twin.load_state_dict(model.state_dict(), assign=True)
    for block in twin.transformer_blocks:
        block.attn1.attend = _softmax_attend.__get__(block.attn1)
    return twin.eval()


def _time_forward(model: SanaDiT, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> float:
    """Seconds for one forward: CPU time of this process on the CPU (other processes on a shared
    machine do not inflate it), wall time after a synchronize on a GPU."""
    clock = time.process_time if x.device.type == "cpu" else time.perf_counter
    start = clock()
    with torch.no_grad():
        model(x, torch.tensor([500]), context, mask)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def attention_scaling(hidden: int, depth: int, side: int, repeats: int) -> dict[str, float]:
    config = SanaConfig(hidden_size=hidden, depth=depth, cross_heads=hidden // 64, caption_channels=256)
    torch.manual_seed(0)
    linear = SanaDiT(config).eval()
    softmax = softmax_twin(linear)
    context = torch.randn(1, 300, 256)
    mask = torch.ones(1, 300)
    sizes = {"N": side, "4N": 2 * side}
    inputs = {k: torch.randn(1, 32, s, s) for k, s in sizes.items()}
    models = {"linear": linear, "softmax": softmax}
    times: dict[tuple[str, str], list[float]] = {(m, s): [] for m in models for s in sizes}
    ratios: dict[str, list[float]] = {m: [] for m in models}
    for model in models.values():  # warm-up
        for size in sizes:
            _time_forward(model, inputs[size], context, mask)
    for _ in range(repeats):
        # N and 4N back to back, variants interleaved: background load drifts slowly, so the
        # per-pair ratio is robust even when absolute times are not
        for name, model in models.items():
            pair = [_time_forward(model, inputs[size], context, mask) for size in sizes]
            for size, seconds in zip(sizes, pair):
                times[(name, size)].append(seconds)
            ratios[name].append(pair[1] / pair[0])
    best = {key: min(v) for key, v in times.items()}
    tokens = {k: s * s for k, s in sizes.items()}
    print(f"\n1) forward time, hidden {hidden}, depth {depth}, {config.linear_heads} heads x 32, batch 1, "
          f"{torch.get_num_threads()} thread(s), best of {repeats}, process CPU time")
    print(f"   {'tokens':>8} {'linear (ms)':>12} {'softmax (ms)':>13}")
    for size in sizes:
        print(f"   {tokens[size]:>8} {best[('linear', size)] * 1e3:>12.1f} {best[('softmax', size)] * 1e3:>13.1f}")
    # ratio of the best (least disturbed) times; the median of back-to-back pair ratios beside it
    ratio_linear = best[("linear", "4N")] / best[("linear", "N")]
    ratio_softmax = best[("softmax", "4N")] / best[("softmax", "N")]
    verdict = "OK" if ratio_linear <= LINEAR_LIMIT else "ABOVE LIMIT"
    print(f"   4x tokens -> linear x{ratio_linear:.2f} ({verdict}, limit x{LINEAR_LIMIT}), "
          f"softmax x{ratio_softmax:.2f}")
    print(f"   (median of back-to-back pair ratios: linear x{statistics.median(ratios['linear']):.2f}, "
          f"softmax x{statistics.median(ratios['softmax']):.2f})")
    return {"linear_ratio": ratio_linear, "softmax_ratio": ratio_softmax}


def solver_accuracy(cfg: float, seed: int) -> dict[str, float]:
    config = SanaConfig(hidden_size=64, depth=2, cross_heads=4, caption_channels=48)
    torch.manual_seed(seed)
    model = SanaDiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(2, 20, 48, generator=g)
    mask = torch.ones(2, 20)
    mask[1, 1:] = 0  # [cond, "empty" uncond]
    noise = torch.randn(1, 32, 16, 16, generator=g)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = model(x.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000, context, mask)
        x0_cond, x0_uncond = (x - sigma * v).chunk(2)
        return x0_uncond + cfg * (x0_cond - x0_uncond)

    def run(sampler, steps: int, kind: str) -> torch.Tensor:
        return sampler(denoiser, noise.clone(), flow_sigmas(steps, DEFAULT_SHIFT, kind=kind), disable=True)

    ref_dpm = run(sample_flow_dpm_solver, 200, "dpm_solver")
    ref_euler = run(sample_flow_dpm_solver, 200, "euler")  # same ODE from the Euler grid's start (sigma 1.0)

    def dist(a: torch.Tensor, ref: torch.Tensor) -> float:
        return float((a - ref).norm() / ref.norm())

    results = {
        "flow_dpm_solver_20": dist(run(sample_flow_dpm_solver, 20, "dpm_solver"), ref_dpm),
        "flow_euler_28": dist(run(sample_flow_euler, 28, "euler"), ref_euler),
        "flow_euler_20": dist(run(sample_flow_euler, 20, "euler"), ref_euler),
        "flow_euler_200_vs_ref": dist(run(sample_flow_euler, 200, "euler"), ref_euler),
    }
    print(f"\n2) distance to a 200-step Flow-DPM-Solver solution (relative L2), tiny random model, CFG {cfg}, "
          "shift 3")
    print(f"   Flow-DPM-Solver 20 steps : {results['flow_dpm_solver_20']:.2e}")
    print(f"   Flow-Euler      28 steps : {results['flow_euler_28']:.2e}")
    print(f"   Flow-Euler      20 steps : {results['flow_euler_20']:.2e}")
    print(f"   Flow-Euler     200 steps : {results['flow_euler_200_vs_ref']:.2e}  (how close the two references are)")
    print(f"   -> Flow-Euler 28 is x{results['flow_euler_28'] / results['flow_dpm_solver_20']:.1f} "
          "farther than Flow-DPM-Solver 20")
    return results


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench sana", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the mid-size model (default 256)")
    parser.add_argument("--depth", type=int, default=2, help="blocks (default 2)")
    parser.add_argument("--side", type=int, default=64,
                        help="latent side for N tokens; 4N uses twice it (default 64: 4096 -> 16384 tokens, 2K -> 4K)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: ratios stay stable on a loaded machine; 0 = torch's choice)")
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU" if not torch.cuda.is_available()
          else f"torch {torch.__version__}, CUDA {torch.cuda.get_device_name()}")
    attention_scaling(args.hidden, args.depth, args.side, args.repeats)
    solver_accuracy(args.cfg, args.seed)
    return 0
