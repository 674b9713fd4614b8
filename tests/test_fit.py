"""The "what fits on my card" table: figures from the planners, the README shows exactly what the command prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from uniba import fit
from uniba.cli import main
from uniba.sana.checks import sana_sampling_bytes, sana_sampling_peak_bytes

README = Path(__file__).resolve().parents[1] / "README.md"
GIB = 1024**3


def _work(name: str) -> fit.Work:
    return next(w for w in fit.WORKS if w.name.startswith(name))


@pytest.mark.parametrize(("name", "dtype", "measured_gib"), [
    # `python -m uniba bench load` on the release-size files (README's benchmark table, the "model" column)
    ("Inf-DiT", "bf16", 1.97), ("Inf-DiT", "fp32", 3.94), ("Sana 1.6B,", "bf16", 2.99), ("Sana 1.6B,", "fp32", 5.98),
    ("Gemma-2", "bf16", 4.87), ("Gemma-2", "fp32", 9.74), ("DC-AE", "fp32", 1.16),
])
def test_weights_equal_the_measured_release_sizes(name: str, dtype: str, measured_gib: float) -> None:
    assert round(_work(name).fit(dtype, 24 * GIB).weights_bytes / GIB, 2) == measured_gib


def test_fp8_is_parameters_times_one_byte() -> None:
    sana = _work("Sana 1.5 4.8B")
    fp8, bf16 = sana.fit("fp8_e4m3fn", 8 * GIB), sana.fit("bf16", 8 * GIB)
    assert 2 * fp8.weights_bytes == bf16.weights_bytes
    assert not bf16.fits and fp8.fits  # 8.8 GiB of bf16 weights cannot fit an 8 GB card
    assert fit.cell(sana, 8).startswith("fp8_e4m3fn ")


def test_sana_4800m_steps_on_a_12_gb_card() -> None:
    """Each step alone: Gemma-2 (4.9 GiB), the fp8 DiT (4.4 GiB) and the decode each fit 12 GB; the bf16 DiT
    (8.8 GiB) too, but not beside Gemma-2, which is why Gemma-2 leaves the card before sampling."""
    table = fit.residency_table(fit.SANA_4800M_PIPELINE, (12,))
    rows = [r for r in table.splitlines() if r.startswith("| 12 GB")]
    assert [r.split(" | ")[1] for r in rows] == ["fp8_e4m3fn", "bf16"]
    assert "DOES NOT FIT" not in table and "fp8_e4m3fn 4.4 + " in rows[0] and "bf16 8.8 + " in rows[1]
    gemma, dit = fit.SANA_4800M_PIPELINE[0][1], fit.SANA_4800M_PIPELINE[1][1]
    both = gemma.fit("bf16", 12 * GIB).weights_bytes + dit.fit("bf16", 12 * GIB).peak_bytes
    assert both > 12 * GIB
    assert "DOES NOT FIT" in fit.residency_table(fit.SANA_4800M_PIPELINE, (8,))


def test_cells_follow_the_planners() -> None:
    infdit = _work("Inf-DiT")
    small, large = infdit.fit("bf16", 8 * GIB), infdit.fit("bf16", 24 * GIB)
    assert small.offloaded == "KV cache" and not large.offloaded  # the planner moves the cache to RAM when short
    assert small.fits and small.peak_bytes <= 8 * GIB
    assert "KV cache in RAM" in fit.cell(infdit, 8)
    gemma = _work("Gemma-2")
    assert fit.cell(gemma, 8) == f"bf16 {gemma.fit('bf16', 8 * GIB).peak_bytes / GIB:.1f}"  # fp32 (10 GiB) left out
    assert fit.cell(_work("Sana 1.6B 4K"), 4).startswith("no (bf16 needs 6.8)")


def test_sana_estimate_is_above_the_lower_bound_the_nodes_refuse_with() -> None:
    for hidden in (1152, 2240):
        peak = sana_sampling_peak_bytes(1, 128, 128, hidden_size=hidden)
        assert peak > sana_sampling_bytes(1, 128, 128, hidden_size=hidden, element_size=4)


def test_readme_table_is_the_command_output() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit"]) == 0
    table = out.getvalue().strip()
    assert table == fit.markdown()
    readme = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- fit table: python -m uniba fit -->\n(.*?)\n<!-- end fit table -->", readme, re.S)
    assert found, "README.md lost its fit table markers"
    assert found.group(1).strip() == table, "README's fit table is stale: paste `python -m uniba fit` into it"


def test_one_card() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit", "--card", "12"]) == 0
    header = out.getvalue().splitlines()[0]
    assert header == "| model, work | smallest plan, bf16 | 12 GB |"


def test_plan_command_answers_the_card_question_with_the_same_table() -> None:
    outputs = []
    for argv in (["plan", "--card", "12", "--card", "16"], ["fit", "--card", "12", "--card", "16"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] and "| 12 GB | 16 GB |" in outputs[0]
    with pytest.raises(SystemExit, match="or a card size"):
        main(["plan"])
    with pytest.raises(SystemExit, match="needs --size"):
        main(["plan", "infdit"])
