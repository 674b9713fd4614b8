"""Bad values at the engine's public functions, the nodes and the CLI: one sentence naming the input and the
fix (issue 23 item 4), and no silently wrong output (item 6): each case below was a library error from deep
inside, or a result computed from the wrong data, before."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from tiny_infdit import load_tiny_infdit, plan_and_upscale
from uniba_pack.nodes import sana_nodes, sana_text_vae_nodes
from uniba_pack.nodes.comfy import host
from uniba_pack.nodes.infdit_nodes import InfDiTUpscale

from uniba.infdit.upscale import NoiseLeftWarning
from uniba.sana.config import SanaConfig
from uniba.sana.sampling import flow_sigmas

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


# --------------------------------------------------------------------------- Sana

GOOD = [[torch.zeros(1, 8, 2304), {"attention_mask": torch.ones(1, 8)}]]


def _sana_sample(latent: torch.Tensor, positive=GOOD, model=None, shift: float = 0.0):
    return sana_nodes.SanaSampler().sample(model, positive, GOOD, {"samples": latent}, seed=0, steps=2, cfg=4.5,
                                           solver="flow_dpm_solver", shift=shift, denoise=1.0)


def _model(**widths) -> types.SimpleNamespace:
    """A MODEL whose DiT config has these widths (what the node reads from the loaded DiT)."""
    config = SanaConfig(hidden_size=64, depth=1, cross_heads=4, **widths)
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(config=config)),
                                 load_device=torch.device("cpu"))


def test_zero_batch_conditioning_and_empty_latent_into_the_sampler() -> None:
    empty = [[torch.zeros(0, 8, 2304), {"attention_mask": torch.ones(0, 8)}]]
    with pytest.raises(ValueError, match=r"^positive: the text conditioning is empty"):  # was ZeroDivisionError
        _sana_sample(torch.zeros(1, 32, 4, 4), positive=empty)
    with pytest.raises(ValueError, match=r"^latent_image: the latent is empty \(shape \(0, 32, 4, 4\)\)"):
        _sana_sample(torch.zeros(0, 32, 4, 4))


def test_widths_come_from_the_loaded_dit_and_the_error_names_the_encoder() -> None:
    """A DiT whose caption projection takes 1024 refuses Gemma-2-2B's 2304, naming the encoder SanaTextEncode
    recorded (was: "use SanaTextEncode, not CLIPTextEncode" when SanaTextEncode was used)."""
    from uniba.sana.checks import SOURCE_KEY

    marked = [[torch.zeros(1, 8, 2304), {"attention_mask": torch.ones(1, 8), SOURCE_KEY: "gemma-2-2b-it"}]]
    with pytest.raises(ValueError, match=r"^positive: the text embeddings are 2304 wide \(from 'SanaTextEncode' with "
                                         r"gemma-2-2b-it\), but this Sana DiT's caption projection takes 1024; load"):
        _sana_sample(torch.zeros(1, 32, 4, 4), positive=marked, model=_model(caption_channels=1024))
    with pytest.raises(ValueError, match=r"^latent_image: expected a Sana latent of shape \(batch, 16, "):
        _sana_sample(torch.zeros(1, 32, 4, 4), model=_model(in_channels=16, out_channels=16))


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan")])
def test_shift_that_breaks_the_schedule_is_refused(shift) -> None:
    """0 made every sigma 0 (the sampler returned its input), -1 ended in a NaN error blaming fp16."""
    with pytest.raises(ValueError, match=r"^shift: must be a number above 0 \(3.0 for Sana up to 2K, 6.0 for 4K\)"):
        flow_sigmas(4, shift)
    with pytest.raises(ValueError, match=r"^shift: must be a number above 0"):
        sana_nodes.SanaFlowSigmas().get_sigmas(4, shift, 1.0)


def test_sampler_names_a_model_shift_of_zero(monkeypatch) -> None:
    monkeypatch.setattr(sana_nodes.comfy_sana, "model_shift", lambda model: 0.0)  # ModelSamplingSD3 at 0
    with pytest.raises(ValueError, match=r"^shift \(0 = the MODEL's, e.g. ModelSamplingSD3's\): must be a number"):
        _sana_sample(torch.zeros(1, 32, 4, 4), model=_model())


def test_lone_surrogate_in_a_prompt() -> None:
    from uniba.sana.text_encoder import encode_prompt

    with pytest.raises(ValueError, match=r"^prompt: character 7 is '\\ud800', half of a character pair"):
        encode_prompt(None, "a cat \ud800")  # was the tokenizer's "TextEncodeInput must be Union[...]"
    with pytest.raises(ValueError, match=r"^text: character 1 is '\\udfff'"):
        sana_text_vae_nodes.SanaTextEncode().encode(None, "\udfff", True)
    with pytest.raises(ValueError, match=r"^prompts\[1\]: expected text, got int"):
        encode_prompt(None, ["ok", 5])


@pytest.mark.parametrize(("args", "says"), [
    ((torch.randn(1, 32, 2, 2), 500.0, torch.randn(1, 77, 768)), r"^context: the text embeddings are 768 wide"),
    ((torch.randn(1, 32, 2, 2), 500.0, torch.randn(8, 2304)), r"^context: expected Sana text conditioning of shape"),
    ((torch.randn(1, 32, 2, 2), 500.0, torch.randn(0, 8, 2304)), r"^context: the text conditioning is empty"),
    ((torch.randn(2, 32, 2, 2), 500.0, torch.randn(3, 8, 2304)), r"^context: holds 3 prompts but x holds 2 latents"),
    ((torch.randn(1, 32, 2, 2), 500.0, torch.randn(1, 8, 2304), torch.ones(1, 77)), r"^context_mask: the attention"),
    ((torch.randn(1, 32, 2, 2), torch.ones(3), torch.randn(1, 8, 2304)), r"^timestep: expected one value or one per"),
    ((torch.randn(0, 32, 2, 2), 500.0, torch.randn(1, 8, 2304)), r"^x: the latent is empty"),
    ((torch.randn(1, 4, 2, 2), 500.0, torch.randn(1, 8, 2304)), r"^x: Sana expects a latent .* 4-channel SD/SDXL"),
])
def test_sana_dit_arguments_are_named(args, says) -> None:
    from tiny_sana import TINY

    from uniba.sana.model import SanaDiT

    dit = SanaDiT(TINY)
    with pytest.raises(ValueError, match=says):  # were matmul/reshape errors and a ZeroDivisionError
        dit(*args)


def test_empty_latent_size_that_is_rounded_is_said(monkeypatch) -> None:
    said = []
    monkeypatch.setattr(host, "warn", lambda message, node_id=None: said.append((message, node_id)))
    (latent,) = sana_nodes.SanaEmptyLatent().generate(1000, 96, "custom", 1, unique_id="4")
    assert latent["samples"].shape == (1, 32, 3, 31)
    assert said == [("SanaEmptyLatent: 1000x96 px is not a multiple of 32 on each side: the latent makes a 992x96 px "
                     "image. Use multiples of 32 to get the size asked for.", "4")]
    sana_nodes.SanaEmptyLatent().generate(1024, 96, "custom", 1)
    assert len(said) == 1


@pytest.fixture
def vae(tmp_path, monkeypatch):
    from tiny_sana_te_vae import write_tiny_dcae

    write_tiny_dcae(tmp_path / "vae", "dcae_tiny.safetensors")
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    return sana_text_vae_nodes.SanaVAELoader().load("dcae_tiny.safetensors", "fp32")[0]


def test_vae_encode_crop_is_said_and_bad_images_refused(vae, monkeypatch) -> None:
    said = []
    monkeypatch.setattr(host, "warn", lambda message, node_id=None: said.append((message, node_id)))
    (latent,) = sana_text_vae_nodes.SanaVAEEncode().encode(vae, torch.rand(1, 80, 96, 3), unique_id="9")
    assert latent["samples"].shape == (1, 32, 2, 3)
    assert said == [("VAE encode: the image is 96x80 px, not a multiple of 32 on each side; the DC-AE encodes its "
                     "centre 96x64 px. Pad or resize it to multiples of 32 to keep every pixel.", "9")]
    for image, says in ((torch.rand(1, 3, 64, 64), "looks channels first"), (torch.rand(1, 64, 64, 5), "5 channels"),
                        (torch.rand(1, 64, 64, 3) * 255, "0..255"), (torch.rand(0, 64, 64, 3), "batch is empty")):
        with pytest.raises(ValueError, match=rf"^image \(VAE encode input\): .*{says}"):
            sana_text_vae_nodes.SanaVAEEncode().encode(vae, image)
    with pytest.raises(ValueError, match=r"^image \(DC-AE encode input\): .*0\.\.255 pixel values"):
        vae.dcae.encode(torch.rand(1, 3, 64, 64) * 255)


# --------------------------------------------------------------------------- Inf-DiT .pt planned from its shapes

def test_pt_of_another_size_is_planned_with_its_own_config(tmp_path, capsys) -> None:
    """A .pt was planned with the release config: the CLI refused a tiny .pt with "the plan is for a 64x64
    input ... not for this 64x64 input". Its shapes now come from data.pkl's opcodes, nothing unpickled."""
    from PIL import Image
    from tiny_infdit import TINY, write_tiny_infdit

    from uniba.checkpoint.shapes import zip_pickle_shapes
    from uniba.cli import main
    from uniba.infdit.plan import config_for_file

    model = write_tiny_infdit(tmp_path, "tiny.pt")  # the release's DeepSpeed layout, tiny shapes
    shapes = zip_pickle_shapes(model)
    assert shapes["mixins.patch_embed.proj.weight"] == (32, 6, 4, 4) and len(shapes) == 86
    assert config_for_file(model) == TINY  # block size, width, depth: the file's own
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (40, 120, 200)).save(image)
    assert main(["plan", "infdit", "--input", "16x16", "--model", str(model), "--vram", "4GB"]) == 0
    assert f"blocks of {TINY.block_px} px" in capsys.readouterr().out  # the release has 128 px blocks
    assert main(["upscale", str(image), str(tmp_path / "out.png"), "--model", str(model), "--steps", "1",
                 "--vram", "4GB"]) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_pt_shape_reader_refuses_what_the_scan_refuses(tmp_path) -> None:
    from uniba.checkpoint import CheckpointError
    from uniba.infdit.plan import config_for_file

    nested: list = []
    for _ in range(150):  # deeper than any checkpoint: the bounded scan's limit is 100
        nested = [nested]
    path = tmp_path / "deep.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "junk": nested}, path)
    with pytest.raises(CheckpointError, match=r"deep\.pt.*values nested more than 100 deep"):
        config_for_file(path)


def test_sampler_cfg_seed_and_empty_latent_size_are_named() -> None:
    """NaN passes ComfyUI's min/max validation (JSON prompts may carry it): it ended as a NaN error blaming fp16."""
    with pytest.raises(ValueError, match=r"^cfg: must be a finite number \(Sana's default is 4.5\), got nan"):
        sana_nodes.SanaSampler().sample(_model(), GOOD, GOOD, {"samples": torch.zeros(1, 32, 4, 4)}, seed=0, steps=2,
                                        cfg=float("nan"), solver="flow_dpm_solver", shift=3.0, denoise=1.0)
    with pytest.raises(ValueError, match=r"^seed: must be from 0 to"):
        sana_nodes.SanaSampler().sample(_model(), GOOD, GOOD, {"samples": torch.zeros(1, 32, 4, 4)}, seed=2**64,
                                        steps=2, cfg=4.5, solver="flow_dpm_solver", shift=3.0, denoise=1.0)
    with pytest.raises(ValueError, match=r"^SanaEmptyLatent: width: must be at least 32, got 0"):
        sana_nodes.SanaEmptyLatent().generate(0, 64, "custom", 1)
    with pytest.raises(ValueError, match=r"^SanaEmptyLatent: batch_size: must be at least 1, got 0"):
        sana_nodes.SanaEmptyLatent().generate(64, 64, "custom", 0)
