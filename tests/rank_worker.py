"""One rank of tests/test_infdit_ranks.py: each case upscaled across 2 ranks (a subgroup) or all 3 and, on
rank 0, in one process too; rank 0 writes the differences (and what it measured) as JSON.

Started the way torchrun starts ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment):
python -m torch.distributed.run --standalone --nproc-per-node 3 tests/rank_worker.py OUT.json CASES.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_infdit import TINY, load_tiny_infdit, plan_and_upscale  # noqa: E402

from uniba.infdit.plan import plan_upscale  # noqa: E402
from uniba.infdit.ranks import plan_ranks, sample_band, split_bands  # noqa: E402
from uniba.infdit.sampling import (  # noqa: E402
    SAMPLERS,
    get_sigmas_karras,
    resolve_sampling,  # noqa: E402
    sample_dpmpp_3m_sde,
)


def sampler(name: str):
    return sample_dpmpp_3m_sde if name == "dpmpp_3m_sde" else SAMPLERS[name]


def oom_above_one_block(model):
    real = model.forward_blocks
    sizes = []

    def flaky(pixels, cond, step, rect, kv, offset=(0, 0), **hooks):
        sizes.append(rect.n_h * rect.n_w)
        if rect.n_h * rect.n_w > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(pixels, cond, step, rect, kv, offset, **hooks)

    model.forward_blocks = flaky
    return sizes


def main() -> None:
    out_path, cases_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_tiny_infdit(TINY, seed=3)
    groups = {world: dist.group.WORLD, 2: dist.new_group([0, 1])}
    results = []
    for case in json.loads(Path(cases_path).read_text()):
        group = groups[case["world"]]
        if rank >= case["world"]:
            continue
        g = torch.Generator().manual_seed(case.get("image_seed", 0))
        lr = torch.rand(1, 3, *case["lr"], generator=g) * 2 - 1
        kwargs = dict(scale=case.get("scale", 4), seed=11, sampler=sampler(case["sampler"]),
                      sigmas=get_sigmas_karras(case.get("steps", 3)), block_batch=case.get("block_batch", 1),
                      offload_cache="on" if case.get("offload") else "off")
        sizes = oom_above_one_block(model) if case.get("oom_rank") == rank else None
        try:
            across = plan_and_upscale(model, lr, group=group, split=case.get("split", "across"),
                             band_sizes=case.get("band_sizes"), **kwargs)
        finally:
            if sizes is not None:
                del model.forward_blocks
        if rank == 0:
            single = plan_and_upscale(model, lr, **kwargs)
            results.append({"case": case, "max_abs": (across - single).abs().max().item(),
                            "mean_abs": single.abs().mean().item(), "shape": list(across.shape)})
        if case.get("oom_rank") is not None:
            # the injected rank: batches of 2 x 2 failed and were halved down to one block
            gathered = [None] * case["world"]
            dist.all_gather_object(gathered, sorted(set(sizes)) if sizes is not None else None, group=group)
            if rank == 0:
                results[-1]["oom_sizes"] = gathered[case["oom_rank"]]
    # bytes moved: one pass sampled by hand, against what the planner says
    lr = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plan = plan_upscale(model.config, 24, 24, 4, None, block_batch=1, dtype=model.dtype,
                        sampling=resolve_sampling(SAMPLERS["euler"], get_sigmas_karras(2)))
    ranks_plan = plan_ranks(plan, model.config, world, dtype=model.dtype)
    canvas = (96, 96)
    bands = split_bands((3, 3), "row-major", world)
    stats = {}
    from uniba.infdit.model import upsample_lr

    sample_band(model, lr, concat_lr=upsample_lr(lr, *canvas), clip_embedding=model.clip.embed(lr),
                noise=torch.randn(1, 3, *canvas, generator=torch.Generator().manual_seed(2)),
                sampler=SAMPLERS["euler"], sigmas=get_sigmas_karras(2), seed=0, bands=bands,
                axis=ranks_plan.passes[0].axis, group=None, block_batch=1, stats=stats)
    sent = torch.tensor([stats["bytes_sent"], stats["bytes_received"]])
    gathered = [torch.zeros_like(sent) for _ in range(world)]
    dist.all_gather(gathered, sent)
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            "world": world, "results": results,
            "bytes": [[int(v) for v in t] for t in gathered],
            "planned_boundary_bytes": list(ranks_plan.passes[0].boundary_bytes),
            "evaluations": plan.evaluations, "describe": ranks_plan.describe(),
            "pid_env": os.environ.get("LOCAL_RANK")}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
