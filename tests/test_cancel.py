"""Cancel takes effect inside long work: within one block of a one-pass DC-AE decode/encode, within one
transformer layer of an Inf-DiT block batch. Each test presses "Cancel" in the middle of a unit of work
(a forward hook sets the host's interrupt flag) and counts the work that still ran after it."""

from __future__ import annotations

import pytest
import torch
from tiny_infdit import load_tiny_infdit
from tiny_sana_te_vae import tiny_dcae_state_dict

from uniba.dcae.loader import load_dcae


class Interrupted(BaseException):
    """Like ComfyUI's InterruptProcessingException (a BaseException on newer hosts)."""


class Host:
    """The host's side of the contract: Cancel sets a flag; the progress callback raises once it is set."""

    def __init__(self) -> None:
        self.flag = False
        self.after = 0  # units of work started after Cancel was pressed

    def press_cancel(self, *_args) -> None:
        self.flag = True

    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None:
        self.check_cancel()

    def check_cancel(self) -> None:
        if self.flag:
            raise Interrupted

    def count(self, *_args) -> None:
        self.after += self.flag


@pytest.fixture(scope="module")
def dcae():
    return load_dcae(tiny_dcae_state_dict())


def _units(modules) -> list[torch.nn.Module]:
    return [block for stage in modules for block in stage]


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_one_pass_dcae_stops_within_one_block(dcae, direction, one_thread) -> None:
    host = Host()
    if direction == "decode":
        blocks = _units(reversed(dcae.decoder.up_blocks)) + [dcae.decoder.conv_out]
        x = torch.randn(1, 32, 4, 4)
    else:
        blocks = [dcae.encoder.conv_in] + _units(dcae.encoder.down_blocks) + [dcae.encoder.conv_out]
        x = torch.rand(1, 3, 128, 128) * 2 - 1
    assert len(blocks) >= 8
    handles = [b.register_forward_pre_hook(host.count) for b in blocks]
    handles.append(blocks[2].register_forward_hook(host.press_cancel))  # Cancel pressed during the third block
    try:
        with pytest.raises(Interrupted):
            # no tile size and no budget: 128 px fits in one pass, the case that checked only at its end
            getattr(dcae, direction)(x, progress=host)
    finally:
        for h in handles:
            h.remove()
    assert host.after == 0, f"{host.after} of {len(blocks)} blocks ran after Cancel"


def test_one_pass_dcae_stops_within_one_layer_of_a_block(dcae, one_thread) -> None:
    """On a CPU one full-resolution ResBlock of a 4K decode runs for seconds: Cancel is also honoured between
    the layers inside a block (the host's check, no progress redraw)."""
    host = Host()
    leaves = [m for m in dcae.decoder.modules() if next(m.children(), None) is None]
    resblock = dcae.decoder.up_blocks[0][-1]  # a full-resolution block near the end of the decode
    handles = [m.register_forward_pre_hook(host.count) for m in leaves]
    handles.append(resblock.conv1.register_forward_hook(host.press_cancel))  # Cancel during its first conv
    try:
        with pytest.raises(Interrupted):
            dcae.decode(torch.randn(1, 32, 4, 4), progress=host)
    finally:
        for h in handles:
            h.remove()
    assert host.after == 0, f"{host.after} layers ran after Cancel (its block has {len(list(resblock.modules()))})"
    assert not dcae.decoder._forward_hooks and not resblock.conv2._forward_hooks  # the cancel points are removed


def test_infdit_block_batch_stops_within_one_layer(one_thread) -> None:
    """One block batch holds the whole canvas here: Cancel is honoured between its transformer layers."""
    import dataclasses

    from tiny_infdit import TINY, plan_and_upscale

    model = load_tiny_infdit(dataclasses.replace(TINY, num_layers=4))
    host = Host()
    layers = [block.attn.qkv for block in model.blocks]
    handles = [layer.register_forward_pre_hook(host.count) for layer in layers]
    handles.append(model.blocks[1].mlp.register_forward_hook(host.press_cancel))  # Cancel during layer 2
    try:
        with pytest.raises(Interrupted):
            plan_and_upscale(model, torch.rand(1, 3, 16, 16) * 2 - 1, steps=2, block_batch=8, progress=host)
    finally:
        for h in handles:
            h.remove()
    assert host.after == 0, f"{host.after} of {len(layers)} layers ran after Cancel"


def test_host_progress_has_a_cancel_point() -> None:
    """The node's reporter offers the cancel point the engine calls inside a block batch."""
    from uniba_pack.nodes.comfy import host

    from uniba.progress import check_cancel

    calls = []
    progress = host.Progress(3)
    original = host.check_interrupt
    host.check_interrupt = lambda: calls.append(1)
    try:
        check_cancel(progress)
    finally:
        host.check_interrupt = original
        progress.close()
    assert calls == [1]


def test_sana_dit_checks_cancel_between_transformer_blocks(one_thread) -> None:
    import dataclasses

    from tiny_sana import TINY, tiny_sana_state_dict

    from uniba.sana.model import SanaDiT

    dit = SanaDiT(dataclasses.replace(TINY, depth=4))
    dit.load_state_dict(tiny_sana_state_dict(dit.config))
    host = Host()
    dit.between_blocks = host.check_cancel  # what the ComfyUI adapter sets: its interrupt check
    blocks = list(dit.transformer_blocks)
    handles = [b.register_forward_pre_hook(host.count) for b in blocks]
    handles.append(blocks[1].register_forward_hook(host.press_cancel))
    try:
        with pytest.raises(Interrupted):
            dit(torch.randn(1, 32, 2, 2), 500.0, torch.randn(1, 5, TINY.caption_channels))
    finally:
        for h in handles:
            h.remove()
    assert host.after == 0, f"{host.after} of {len(blocks)} blocks ran after Cancel"


def test_model_loading_stops_within_one_tensor(tmp_path) -> None:
    """Reading the weights (seconds to minutes for a multi-GB file on a slow disk) checks Cancel per tensor."""
    from tiny_infdit import write_tiny_infdit

    from uniba.infdit import load_infdit

    path = write_tiny_infdit(tmp_path)
    host, reports = Host(), []

    def progress(done: int, total: int | None = None, preview=None) -> None:
        reports.append((done, total))
        host.after += host.flag  # a tensor was read after Cancel was pressed
        host.check_cancel()
        if done == 3:
            host.press_cancel()

    with pytest.raises(Interrupted):
        load_infdit(path, progress=progress)
    assert reports[-1][0] == 4 and reports[-1][1] > 50  # stopped at the next tensor of ~86
    assert host.after == 1
