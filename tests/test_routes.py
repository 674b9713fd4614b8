"""The plan route answers what the InfDiTUpscale node will do: same planner, same dtype rule, same free memory."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from tiny_infdit import write_tiny_infdit
from uniba_pack.nodes import infdit_nodes, routes

from uniba.infdit import plan as planner
from uniba.infdit.sampling import get_sigmas_karras, sample_dpmpp_2m

GIB = 2**30


def _query(**kw) -> dict[str, str]:
    base = {"width": "1024", "height": "768", "scale": "4", "block_batch": "auto", "offload_cache": "auto"}
    base.update({k: str(v) for k, v in kw.items()})
    return base


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    routes._file_facts.clear()
    return tmp_path


def test_release_plan_equals_the_planner(models_dir) -> None:
    answer = routes.plan_for_query(_query(), free_bytes=lambda: 12 * GIB)
    direct = planner.plan_upscale(planner.release_config(), 768, 1024, 4, 12 * GIB, dtype=torch.float32,
                                  weights_resident=False).to_dict()  # nothing loaded: the weights must fit too
    assert {k: answer[k] for k in direct} == direct
    assert answer["model"] == "release" and answer["dtype"] == "float32"  # auto on the CPU is fp32
    last, first = answer["passes"][-1], answer["passes"][0]
    assert (last["out_width"], last["out_height"]) == (4096, 3072)
    assert (first["in_width"], first["in_height"], answer["scale"]) == (1024, 768, 4)
    assert set(answer) == set(direct) | {"model", "dtype", "device"}  # one field per fact, no echo of the request
    assert json.loads(json.dumps(answer)) == answer  # plain JSON


def test_free_memory_drives_block_batch_and_fit(models_dir) -> None:
    roomy = routes.plan_for_query(_query(), free_bytes=lambda: 80 * GIB)
    tight = routes.plan_for_query(_query(), free_bytes=lambda: 3 * GIB)
    area = [a["passes"][-1]["block_batch"][0] * a["passes"][-1]["block_batch"][1] for a in (roomy, tight)]
    assert area[0] > area[1]
    assert roomy["peak_bytes"] > tight["peak_bytes"]
    forced = routes.plan_for_query(_query(block_batch=16, offload_cache="off"), free_bytes=lambda: 3 * GIB)
    assert forced["fits"] is False and forced["passes"][-1]["offload_cache"] is False
    offloaded = routes.plan_for_query(_query(block_batch=1, offload_cache="on"), free_bytes=lambda: 3 * GIB)
    assert offloaded["passes"][-1]["offload_cache"] is True
    sixteen = routes.plan_for_query(_query(scale=16, width=256, height=192), free_bytes=lambda: 12 * GIB)
    assert len(sixteen["passes"]) == 2 and sixteen["passes"][-1]["out_width"] == 4096


def test_model_file_config_is_read_from_its_header(models_dir) -> None:
    path = write_tiny_infdit(models_dir / "infdit", "tiny.safetensors")
    answer = routes.plan_for_query(_query(model="tiny.safetensors", width=64, height=48), free_bytes=lambda: GIB)
    config = planner.config_for_file(path)
    direct = planner.plan_upscale(config, 48, 64, 4, GIB, dtype=torch.float32, weights_resident=False).to_dict()
    assert {k: answer[k] for k in direct} == direct
    assert answer["model"] == "tiny.safetensors"
    assert answer["block_px"] == config.block_px != planner.release_config().block_px


def test_missing_model_falls_back_to_the_release_plan(models_dir) -> None:
    answer = routes.plan_for_query(_query(model="Inf-DiT.safetensors"), free_bytes=lambda: 12 * GIB)
    assert answer["model"].startswith("release (Inf-DiT.safetensors not found")
    assert answer["block_px"] == planner.release_config().block_px


def test_not_an_infdit_file_is_a_clear_error(models_dir) -> None:
    from uniba.checkpoint import save_safetensors

    (models_dir / "infdit").mkdir()
    save_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)},
                     models_dir / "infdit" / "sdxl.safetensors")
    with pytest.raises(routes.BadRequest, match="sdxl.safetensors"):
        routes.plan_for_query(_query(model="sdxl.safetensors"), free_bytes=lambda: GIB)


def test_model_must_be_listed_in_the_infdit_folder(models_dir) -> None:
    """Paths, `..` and other folders' files answer exactly like a missing file: no probing, no foreign headers."""
    write_tiny_infdit(models_dir / "infdit", "tiny.safetensors")
    write_tiny_infdit(models_dir / "vae", "elsewhere.safetensors")  # a valid header, in another folder
    (models_dir / "infdit" / "notes.txt").write_text("not a model")
    outside = models_dir / "vae" / "elsewhere.safetensors"

    def answer(model: str) -> dict:
        result = routes.plan_for_query(_query(model=model), free_bytes=lambda: 12 * GIB)
        return {**result, "model": result["model"].replace(model, "NAME")}

    missing = answer("absent.safetensors")
    assert missing["model"] == "release (NAME not found in models/infdit)"
    for probe in (str(outside), "../vae/elsewhere.safetensors", "sub/../../vae/elsewhere.safetensors",
                  "/etc/passwd", "notes.txt", str(models_dir / "infdit" / "tiny.safetensors")):
        assert answer(probe) == missing, probe
    assert routes.plan_for_query(_query(model="tiny.safetensors"), free_bytes=lambda: 12 * GIB)["model"] == \
        "tiny.safetensors"


@pytest.mark.parametrize("query,message", [
    ({"width": None}, "width is required"),
    ({"width": "abc"}, "whole number"),
    ({"width": "inf"}, "whole number"),
    ({"height": "-Infinity"}, "whole number"),
    ({"width": "nan"}, "whole number"),
    ({"width": "1e999"}, "whole number"),
    ({"height": "12.5"}, "whole number"),
    ({"height": "0"}, "between 1 and"),
    ({"scale": "3"}, "scale must be one of"),
    ({"block_batch": "0"}, "block_batch must be one of"),
    ({"offload_cache": "maybe"}, "offload_cache must be one of"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"steps": "\u00b2"}, "steps must be a whole number of steps between 1 and 200, got '\u00b2'"),
    ({"steps": "\u0663"}, "steps must be a whole number"),  # an Arabic-Indic 3: a digit, but not ASCII
    ({"steps": "9" * 5000}, r"steps must be .* \(5000 characters\)"),
    ({"width": "1" * 5000}, r"width must be a whole number of pixels .* \(5000 characters\)"),
    ({"height": "1e3"}, "whole number"),
    ({"steps": "0"}, "between 1 and 200"),
    ({"sampler": "no_such_sampler"}, "sampler must be one of"),
])
def test_bad_queries_name_the_input(models_dir, query, message) -> None:
    q = _query(**{k: v for k, v in query.items() if v is not None})
    for k, v in query.items():
        if v is None:
            q.pop(k)
    with pytest.raises(routes.BadRequest, match=message):
        routes.plan_for_query(q, free_bytes=lambda: GIB)


def test_route_offers_exactly_the_node_choices() -> None:
    spec = infdit_nodes.InfDiTUpscale.INPUT_TYPES()["required"]
    assert list(routes.SCALES) == list(spec["scale"][0])
    assert list(routes.BLOCK_BATCHES) == list(spec["block_batch"][0])
    assert list(routes.OFFLOAD) == list(spec["offload_cache"][0])
    assert list(routes.DTYPES) == list(infdit_nodes.InfDiTLoader.INPUT_TYPES()["required"]["dtype"][0])


def test_node_runs_the_plan_the_route_shows(models_dir, monkeypatch, one_thread) -> None:
    write_tiny_infdit(models_dir / "infdit", "tiny.safetensors")
    free = 2 * GIB
    monkeypatch.setattr(infdit_nodes.host, "free_memory", lambda device=None, patcher=None: free)
    seen = []
    real = infdit_nodes.plan_upscale

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        seen.append(plan.to_dict())
        return plan

    monkeypatch.setattr(infdit_nodes, "plan_upscale", spy)
    (model,) = infdit_nodes.InfDiTLoader().load("tiny.safetensors", "auto")
    image = torch.rand(1, 40, 56, 3)
    (out,) = infdit_nodes.InfDiTUpscale().upscale(model, image, scale="4", steps=1, seed=0, block_batch="2")
    assert tuple(out.shape) == (1, 160, 224, 3)
    answer = routes.plan_for_query(_query(model="tiny.safetensors", width=56, height=40, block_batch=2, steps=1),
                                   free_bytes=lambda: free)
    assert seen and {k: answer[k] for k in seen[0]} == seen[0]
    # a wired sampler: the node counts its evaluations, and the route, told the sampler's name, counts the same
    sigmas = get_sigmas_karras(4)
    infdit_nodes.InfDiTUpscale().upscale(model, image, "4", 1, 0, "2", "auto", "none", sample_dpmpp_2m, sigmas)
    wired = routes.plan_for_query(_query(model="tiny.safetensors", width=56, height=40, block_batch=2, steps=4,
                                         sampler="dpmpp_2m"), free_bytes=lambda: free)
    assert seen[-1]["evaluations"] == wired["evaluations"] == 4 and seen[0]["evaluations"] == 1
    assert routes.plan_for_query(_query(steps=4), free_bytes=lambda: free)["evaluations"] == 7  # Heun: 2 x 4 - 1


def test_handler_answers_json(models_dir) -> None:
    pytest.importorskip("aiohttp")
    from aiohttp.test_utils import make_mocked_request

    ok = asyncio.run(routes.infdit_plan(make_mocked_request("GET", "/uniba/infdit/plan?width=512&height=512")))
    assert ok.status == 200 and json.loads(ok.body)["passes"][-1]["out_width"] == 2048
    bad = asyncio.run(routes.infdit_plan(make_mocked_request("GET", "/uniba/infdit/plan?width=512")))
    assert bad.status == 400 and "height is required" in json.loads(bad.body)["error"]
    for query in ("width=inf&height=512", "width=512&height=1e400", "width=NaN&height=512", "width=x&height=1"):
        answer = asyncio.run(routes.infdit_plan(make_mocked_request("GET", f"/uniba/infdit/plan?{query}")))
        assert answer.status == 400 and "whole number of pixels" in json.loads(answer.body)["error"], query


def test_route_registers_only_inside_comfyui() -> None:
    assert routes.register() is False
    assert routes.PLAN_ROUTE == "/uniba/infdit/plan"


def test_file_reads_run_off_the_event_loop_with_a_time_limit(models_dir, monkeypatch) -> None:
    """A model file that takes long to read delays only its own answer (a 400 naming it), never the event loop,
    and it is read once however often the readout asks."""
    import threading

    write_tiny_infdit(models_dir / "infdit", "slow.safetensors")
    release = threading.Event()
    reads, loop_threads = [], []

    def slow_config(path):
        reads.append(threading.current_thread().name)
        release.wait(5)
        return planner.release_config()

    monkeypatch.setattr(routes, "config_for_file", slow_config)

    async def scenario():
        loop_threads.append(threading.current_thread().name)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        query = _query(model="slow.safetensors")
        first = await routes.answer_query(query, free_bytes=lambda: GIB, time_limit=0.3)
        second = await routes.answer_query(query, free_bytes=lambda: GIB, time_limit=0.3)
        tick.cancel()
        return first, second, ticks

    first, second, ticks = asyncio.run(scenario())
    release.set()
    for status, body in (first, second):
        assert status == 400 and body["error"].startswith("model 'slow.safetensors' took more than 0.3 s to read")
    assert ticks >= 20  # the event loop kept running while the file was being read
    assert len(reads) == 1 and reads[0].startswith("uniba-plan") and reads[0] != loop_threads[0]


def test_readout_says_the_weights_are_loaded_only_when_they_are(models_dir, monkeypatch) -> None:
    """The plan route planned every file as if its weights were already loaded: the readout said so (and left
    the weights out of the budget) with nothing loaded. Now only a loaded file's plan does."""
    write_tiny_infdit(models_dir / "infdit", "tiny.safetensors")
    query = _query(model="tiny.safetensors", width=64, height=48)
    cold = routes.plan_for_query(query, free_bytes=lambda: GIB)
    assert cold["weights_resident"] is False and "already loaded" not in cold["description"]
    (model,) = infdit_nodes.InfDiTLoader().load("tiny.safetensors", "fp32")
    warm = routes.plan_for_query(query, free_bytes=lambda: GIB)
    assert warm["weights_resident"] is True and "already loaded" in warm["description"]
    assert cold["usable_bytes"] < warm["usable_bytes"]  # the weights come out of the budget only when not loaded
    del model
