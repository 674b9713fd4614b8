"""``python -m uniba bench load``: what loading each released checkpoint costs, and a full-size forward smoke.

Every measurement runs in a fresh Python process, so one load's memory never hides another's. The child
imports everything first, then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), so the figure
is the peak *above* the imported baseline while the loader runs. It is compared with the size of what was
loaded (parameters and buffers of the model as built): a loader that keeps a second full copy, or converts
through fp32, shows a ratio near 2 or more; the target is <= 1.25 for safetensors and zip pickles.

``--forward`` also runs one small forward per model in fp32 and in bf16 (Inf-DiT: one block batch of a
256 px output; Sana: a 16x16 latent; DC-AE: a 256 px decode; Gemma-2: one prompt) and prints max abs and
relative L2 of bf16 against fp32; ``--forward-dtypes bf16,fp16`` adds fp16. Any NaN/inf fails the run.
Files come from ``tests/make_release_size.py`` (random weights, release shapes) or are real downloads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch  # noqa: F401 - imported before the baseline, so the load does not count it
import torch

from . import dcae, fit, infdit, sana
from .devices import DTYPES, FP8, STORAGE_DTYPES, dtype_name
from .infdit.blockwise import denoise

# Where tests/make_release_size.py puts each format, and which loader reads it.
KNOWN_FILES: tuple[tuple[str, str], ...] = (
    ("infdit", "infdit/mp_rank_00_model_states.pt"),
    ("sana", "diffusion_models/Sana_1600M_1024px_BF16.pth"),
    ("sana", "diffusion_models/Sana_1600M_4Kpx_BF16.pth"),
    ("sana", "diffusion_models/SANA1.5_4.8B_1024px_BF16.pth"),
    ("sana", "diffusion_models/Sana_1600M_1024px_BF16_diffusers/transformer"),
    ("gemma", "text_encoders/gemma-2-2b-it"),
    ("gemma", "text_encoders/gemma_2_2b_fp16.safetensors"),
    ("dcae", "vae/dc-ae-f32c32-sana-1.1.safetensors"),
)
KINDS = ("infdit", "sana", "dcae", "gemma")
RATIO_LIMIT = 1.25


# ------------------------------------------------------------------------------------------------ child side


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRss:
    """Peak resident memory above the baseline at ``start()``: the kernel's high-water mark, reset first."""

    def start(self) -> None:
        gc.collect()
        self.baseline = _status_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)

    def peak_above_baseline(self) -> int:
        return max(0, _status_kib("VmHWM") * 1024 - self.baseline)


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def touch_pages(module: torch.nn.Module) -> None:
    """Read one byte of every memory page of every parameter and buffer."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                flat = tensor.detach().reshape(-1) if tensor.is_contiguous() else tensor.detach().contiguous().view(-1)
                flat.view(torch.uint8)[::4096].sum()


def _loader(kind: str) -> Callable[..., Any]:
    """The family's load function; reaching it imports its module (the families export lazily)."""
    if kind == "infdit":
        return infdit.load_infdit
    if kind == "sana":
        return sana.load_sana
    if kind == "dcae":
        return dcae.load_dcae
    if kind == "gemma":
        return sana.load_text_encoder
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def _load(kind: str, path: str, dtype_name: str | None) -> tuple[Any, torch.nn.Module]:
    if dtype_name == FP8:  # fp8 storage computes in bf16, as on a GPU (only Sana's loader offers it)
        if kind != "sana":
            raise ValueError(f"{FP8} storage is offered for the Sana DiT only, not {kind}")
        loaded = sana.load_sana(path, torch.bfloat16, storage_dtype=STORAGE_DTYPES[FP8])
        return loaded, loaded
    loaded = _loader(kind)(path, DTYPES.get(dtype_name or ""))
    return loaded, (loaded.model if kind == "gemma" else loaded)


def _warm_imports(kind: str) -> None:
    """Import everything the load needs before the baseline, so imports are not counted as load memory."""
    if kind == "gemma":
        # transformers is optional and heavy: only the Gemma load imports it
        from transformers import Gemma2Model, GemmaTokenizer  # noqa: F401
    _loader(kind)


def _forward(kind: str, loaded: Any, seed: int = 0) -> torch.Tensor:
    """One small forward at full model size (inputs drawn on the CPU from ``seed``, fp32, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if kind == "infdit":
            model = loaded
            px = 2 * model.config.block_px  # 256 px output: a 2x2-block canvas, one block batch
            lr = torch.rand((1, 3, px // 4, px // 4), generator=gen) * 2 - 1
            x = torch.randn((1, 3, px, px), generator=gen)
            if model.clip is not None:
                emb = model.clip.embed(lr)
            else:
                emb = torch.nn.functional.normalize(torch.randn((1, model.config.vector_dim), generator=gen), dim=-1)
            return denoise(model, x, 1.0, lr, emb, block_batch=(2, 2)).float()
        if kind == "sana":
            model = loaded
            x = torch.randn((1, model.config.in_channels, 16, 16), generator=gen)
            context = torch.randn((1, 300, model.config.caption_channels), generator=gen)
            mask = torch.ones((1, 300), dtype=torch.int64)
            mask[:, 40:] = 0
            return model(x, torch.tensor([500.0]), context, mask).float()
        if kind == "dcae":
            latent = torch.randn((1, 32, 8, 8), generator=gen)
            return loaded.decode(latent).float()
        if kind == "gemma":
            emb, mask = sana.encode_prompt(loaded, ["a red fox in a snowy forest at sunrise, soft golden light"])
            return (emb * mask[..., None]).float()
    raise ValueError(kind)


def _main_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype holding most of the model's bytes (fp8 storage keeps norms and tables in the compute dtype)."""
    totals: dict[torch.dtype, int] = {}
    for t in module.state_dict().values():
        totals[t.dtype] = totals.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(totals, key=totals.__getitem__)


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    kind, path = spec["kind"], spec["path"]
    torch.set_num_threads(int(spec.get("threads") or 2))
    _warm_imports(kind)
    meter = PeakRss()
    meter.start()
    start = time.perf_counter()
    loaded, module = _load(kind, path, spec.get("dtype"))
    seconds = time.perf_counter() - start
    # Memory-mapped weights are read lazily: touch every page, as the first forward would, so the peak
    # counts what the model really occupies once in use.
    touch_pages(module)
    ready = time.perf_counter() - start
    result: dict[str, Any] = {
        "kind": kind, "path": path, "load_s": seconds, "ready_s": ready, "peak_bytes": meter.peak_above_baseline(),
        "model_bytes": model_bytes(module), "dtype": dtype_name(_main_dtype(module)),
    }
    if spec.get("forward_out"):
        meter.start()
        start = time.perf_counter()
        out = _forward(kind, loaded)
        result["forward_s"] = time.perf_counter() - start
        result["forward_peak_bytes"] = meter.peak_above_baseline()
        result["finite"] = bool(torch.isfinite(out).all())
        torch.save(out.cpu(), spec["forward_out"])
    return result


# ----------------------------------------------------------------------------------------------- parent side


def _file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "safetensors shards"
    if path.suffix in (".safetensors", ".sft"):
        return "safetensors"
    return "zip pickle" if zipfile.is_zipfile(path) else "legacy pickle"


def run_child(kind: str, path: Path, dtype: str | None, forward_out: str | None = None,
              threads: int = 2) -> dict[str, Any]:
    spec = {"kind": kind, "path": str(path), "dtype": dtype, "forward_out": forward_out, "threads": threads}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                       else [])))
    proc = subprocess.run([sys.executable, "-m", "uniba.bench_load", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"kind": kind, "path": str(path), "error": " | ".join(tail) or f"exit code {proc.returncode}"}


def run_comfy_child(script: Path, path: Path, dtype: str | None, threads: int = 2) -> dict[str, Any]:
    """The Sana DiT Loader node inside a booted ComfyUI: ``script`` (the pack checkout's ComfyUI-side child,
    given with ``--comfyui-child``) runs under ``COMFYUI_PYTHON`` with ``COMFYUI_DIR``."""
    spec = {"path": str(path), "dtype": dtype or "auto", "threads": threads}
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([python, str(script), json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"kind": "sana (ComfyUI)", "path": str(path), "error": " | ".join(tail) or f"exit {proc.returncode}"}


def discover(folder: Path) -> list[tuple[str, Path]]:
    found = [(kind, folder / rel) for kind, rel in KNOWN_FILES if (folder / rel).exists()]
    if not found:
        raise FileNotFoundError(f"{folder} holds none of the release files ({', '.join(r for _, r in KNOWN_FILES)}); "
                                "write them with: python tests/make_release_size.py " + str(folder))
    return found


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _compare(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (a.double() - ref.double())
    return float(diff.abs().max()), float(diff.norm() / ref.double().norm().clamp_min(1e-30))


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench load", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="the folder written by tests/make_release_size.py, or checkpoint files/folders")
    parser.add_argument("--kind", choices=KINDS, help="loader for explicit files (default: from the folder layout)")
    parser.add_argument("--dtype", default="stored",
                        help="comma-separated load dtypes: stored (the file's own), bf16, fp16, fp32, and for the Sana "
                             f"DiT {FP8} (weights stored in fp8, computed in bf16) (default stored)")
    parser.add_argument("--only", default="", help="comma-separated kinds to run (infdit, sana, dcae, gemma)")
    parser.add_argument("--forward", action="store_true",
                        help="also run one forward per model in bf16 and fp32 and compare (fresh process each)")
    parser.add_argument("--forward-dtypes", default="bf16",
                        help=f"comma-separated dtypes the forward smoke compares with the reference (bf16, fp16, "
                             f"{FP8})")
    parser.add_argument("--forward-reference", default="fp32", choices=("fp32", "bf16"),
                        help="the forward smoke's reference dtype; bf16 for models whose fp32 copy does not fit in RAM "
                             "(SANA-1.5 4.8B: 19 GB in fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--comfyui-child", type=Path,
                        help="with COMFYUI_DIR: also load Sana through the node in ComfyUI, run by this script (the "
                             "pack checkout's tests/integration/bench_comfy_load.py; COMFYUI_PYTHON runs it)")
    args = parser.parse_args(argv)
    if args.comfyui_child is not None and not args.comfyui_child.is_file():
        parser.error(f"--comfyui-child {args.comfyui_child} does not exist")

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("stored", *DTYPES, FP8)]
    if bad:
        parser.error(f"--dtype {','.join(bad)}: choose from stored, {', '.join(DTYPES)}, {FP8}")
    halves = [d.strip() for d in args.forward_dtypes.split(",") if d.strip()]
    if not halves or set(halves) - {"bf16", "fp16", FP8} or args.forward_reference in halves:
        parser.error(f"--forward-dtypes {args.forward_dtypes}: choose from bf16, fp16, {FP8}, other than the "
                     f"reference {args.forward_reference}")
    only = {k.strip() for k in args.only.split(",") if k.strip()}
    if only - set(KINDS):
        parser.error(f"--only {','.join(sorted(only - set(KINDS)))}: choose from {', '.join(KINDS)}")
    targets: list[tuple[str, Path]] = []
    for path in args.paths:
        if not path.exists():
            parser.error(f"{path} does not exist")
        if args.kind:
            targets.append((args.kind, path))
        else:
            targets += discover(path)
    targets = [(k, p) for k, p in targets if not only or k in only]

    print(f"python -m uniba bench load: fresh process per load, {args.threads} threads, peak RSS above the "
          f"imported baseline; target peak/model <= {RATIO_LIMIT} for safetensors and zip pickles")
    header = (f"{'file':52s} {'format':18s} {'file GiB':>8s} {'dtype':>6s} {'model GiB':>9s} {'load s':>7s} "
              f"{'ready s':>7s} {'peak GiB':>8s} {'peak/model':>10s}")
    print(header)
    failures = 0
    runs = [(kind, path, dtype, False) for kind, path in targets for dtype in dtypes if dtype != FP8 or kind == "sana"]
    if os.environ.get("COMFYUI_DIR") and args.comfyui_child:
        runs += [(kind, path, dtype, True) for kind, path, dtype, _ in runs if kind == "sana"]
    else:
        print("(the ComfyUI loader path for Sana needs COMFYUI_DIR and --comfyui-child; skipped)")
    for kind, path, dtype, via_comfy in runs:
        wanted = None if dtype == "stored" else dtype
        result = (run_comfy_child(args.comfyui_child, path, wanted, args.threads) if via_comfy
                  else run_child(kind, path, wanted, threads=args.threads))
        name = str(path.relative_to(args.paths[0])) if args.paths[0] in path.parents else str(path)
        name = ("ComfyUI: " if via_comfy else "") + name[-(43 if via_comfy else 52):]
        if "error" in result:
            print(f"{name[-52:]:52s} ERROR {result['error']}")
            failures += 1
            continue
        ratio = result["peak_bytes"] / max(result["model_bytes"], 1)
        verdict = "" if ratio <= RATIO_LIMIT else "  over"
        failures += bool(verdict)
        print(f"{name[-52:]:52s} {_format_of(path):18s} {_gib(_file_bytes(path)):>8s} "
              f"{result['dtype'].removesuffix('_e4m3fn'):>6s} "
              f"{_gib(result['model_bytes']):>9s} {result['load_s']:7.1f} {result['ready_s']:7.1f} "
              f"{_gib(result['peak_bytes']):>8s} "
              f"{ratio:10.2f}{verdict}", flush=True)
    if args.forward:
        failures += _forward_table(targets, args.threads, halves, args.forward_reference)
    if any(kind == "sana" for kind, _ in targets):
        print("\n" + fit.residency_table(fit.SANA_4800M_PIPELINE, (12, 16)))
    return 1 if failures else 0


def _forward_table(targets: list[tuple[str, Path]], threads: int, halves: list[str], reference: str = "fp32") -> int:
    print(f"\nforward smoke, {' and '.join(halves)} against {reference} (same weights; fresh process each; inputs "
          f"seeded on the CPU; {FP8} = weights stored in fp8, computed in bf16)")
    print(f"{'file':52s} {'dtype':>5s} {'this s':>7s} {reference + ' s':>7s} {'max abs':>9s} {'rel L2':>9s}  finite")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, path) in enumerate(targets):
            outs: dict[str, torch.Tensor] = {}
            times: dict[str, float] = {}
            for dtype in [reference] + [h for h in halves if h != FP8 or kind == "sana"]:
                out_file = os.path.join(tmp, f"{i}_{dtype}.pt")
                result = run_child(kind, path, dtype, forward_out=out_file, threads=threads)
                if "error" in result:
                    print(f"{str(path)[-52:]:52s} {dtype:>5s} ERROR {result['error']}", flush=True)
                    failures += 1
                    if dtype == reference:
                        break
                    continue
                times[dtype] = result["forward_s"]
                outs[dtype] = torch.load(out_file, weights_only=True)
                if not result["finite"]:
                    print(f"{str(path)[-52:]:52s} {dtype:>5s} NaN/inf in the output: FAILED", flush=True)
                    failures += 1
                    outs.pop(dtype)
                    continue
                if dtype == reference:
                    continue
                max_abs, rel = _compare(outs[dtype], outs[reference])
                print(f"{str(path)[-52:]:52s} {dtype.removesuffix('_e4m3fn'):>5s} {times[dtype]:7.1f} "
                      f"{times[reference]:7.1f} {max_abs:9.3g} {rel:9.3g}  yes", flush=True)
    return failures


def _child_entry() -> int:
    spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
    result = child_main(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_entry())

