"""Bad values at the engine's public functions, the nodes and the CLI: one sentence naming the input and the
fix (issue 23 item 4), and no silently wrong output (item 6): each case below was a library error from deep
inside, or a result computed from the wrong data, before."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from tiny_infdit import load_tiny_infdit, plan_and_upscale
from uniba_pack.nodes.comfy import host
from uniba_pack.nodes.infdit_nodes import InfDiTUpscale

from uniba.infdit.upscale import NoiseLeftWarning

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def infdit():
    return load_tiny_infdit()


def _lr(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize(("lr", "kwargs", "says"), [
    (_lr(0, 3, 16, 16), {}, r"^lr \(the input image\): the batch is empty"),  # was torch.cat's error
    (_lr(1, 3, 16, 16), {"scale": "abc"}, r"^scale: must be one of 2, 4, 8, 16, got 'abc'"),  # was int()'s
    (_lr(1, 3, 16, 16), {"seed": 2**64}, r"^seed: must be from 0 to 18446744073709551615"),  # "Overflow when unpacking"
    (_lr(1, 3, 16, 16), {"seed": -1}, r"^seed: must be at least 0"),
    (_lr(1, 3, 16, 16), {"steps": 1.5}, r"^steps: expected a whole number, got 1.5"),  # was linspace()'s TypeError
    ((_lr(1, 3, 16, 16) + 1) * 127.5, {}, r"0\.\.255 pixel values\. Pass image / 127\.5 - 1"),  # was upscaled as is
    (_lr(1, 16, 16, 3), {}, r"looks channels last .* pass image\.movedim\(-1, 1\)"),
    (_lr(1, 5, 16, 16), {}, r"has 5 channels .* expected 3 or 4 .*image\[:, :4\]"),
])
def test_engine_upscale_names_the_bad_input(infdit, lr, kwargs, says) -> None:
    with pytest.raises(ValueError, match=says):
        plan_and_upscale(infdit, lr, **{"steps": 1, **kwargs})


def test_schedule_that_stops_above_zero_is_said(infdit) -> None:
    with pytest.warns(NoiseLeftWarning, match=r"^sigmas: the schedule stops at sigma 1, not 0"):
        plan_and_upscale(infdit, _lr(1, 3, 16, 16), sigmas=torch.tensor([40.0, 10.0, 1.0]))


@pytest.fixture
def patcher(infdit):
    return host.wrap_model(infdit, torch.device("cpu"), torch.device("cpu"))


@pytest.mark.parametrize(("image", "args", "says"), [
    (torch.rand(0, 16, 16, 3), {}, r"^image: the batch is empty"),
    (torch.rand(1, 3, 16, 16), {}, r"^image: shape \(1, 3, 16, 16\) looks channels first"),  # was cut to 3 columns
    (torch.rand(1, 16, 16, 5), {}, r"^image: has 5 channels"),  # the fifth was dropped, the fourth taken as alpha
    (torch.rand(1, 16, 16, 3) * 255, {}, r"^image: values reach .* 0\.\.1 is expected\. It looks like 0\.\.255"),
    (torch.rand(1, 16, 16, 3), {"seed": 2**64}, r"^seed: must be from 0 to"),
    (torch.rand(1, 16, 16, 3), {"scale": "abc"}, r"^scale: must be one of 2, 4, 8, 16"),
])
def test_node_names_the_bad_input(patcher, image, args, says) -> None:
    values = {"scale": "4", "steps": 1, "seed": 0, **args}
    with pytest.raises(ValueError, match=says):
        InfDiTUpscale().upscale(patcher, image, values["scale"], values["steps"], values["seed"], "auto", "off", "none")


def test_node_shows_engine_warnings_in_the_log_and_the_browser(patcher, monkeypatch, caplog) -> None:
    sent = []
    instance = types.SimpleNamespace(client_id="client-1",
                                     send_sync=lambda event, data, sid=None: sent.append((event, data, sid)))
    monkeypatch.setattr(host, "_prompt_server", lambda: instance)
    monkeypatch.setattr(host, "IN_COMFYUI", True)
    with pytest.warns(UserWarning, match="not ours"), caplog.at_level("WARNING", logger="uniba"), \
            host.engine_warnings("7"):
        warnings.warn("sigmas: the schedule stops at sigma 1", NoiseLeftWarning, stacklevel=1)
        warnings.warn("not ours", UserWarning, stacklevel=1)  # passed on, not shown as the pack's
    assert [r.getMessage() for r in caplog.records] == ["sigmas: the schedule stops at sigma 1"]
    assert sent == [("uniba.warning", {"message": "sigmas: the schedule stops at sigma 1", "node": "7"}, "client-1")]


def test_node_forwards_the_schedule_warning(patcher, monkeypatch) -> None:
    said = []
    monkeypatch.setattr(host, "warn", lambda message, node_id=None: said.append((message, node_id)))
    InfDiTUpscale().upscale(patcher, torch.rand(1, 16, 16, 3), "4", 1, 0, "auto", "off", "none",
                            sigmas=torch.tensor([40.0, 10.0, 1.0]), unique_id="3")
    assert len(said) == 1 and said[0][1] == "3"
    assert said[0][0].startswith("sigmas: the schedule stops at sigma 1, not 0")
