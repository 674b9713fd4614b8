"""Write every released checkpoint format at full size, with random weights, for load and forward benchmarks.

Not a test (pytest does not collect it: the name does not start with ``test_`` and nothing runs on import).
Run it by hand, outside the suite; the files are 2-5 GB each, ~24 GB in all, so put them OUTSIDE the repo::

    python tests/make_release_size.py /work/release-files            # everything
    python tests/make_release_size.py /work/release-files --only sana_1024,dcae
    python -m uniba bench load /work/release-files                   # then measure loading

What is written (shapes from the release configs in ``uniba``, layouts as the releases ship them):

==================  ===============================================================  =====================
name                file(s)                                                          format
==================  ===============================================================  =====================
infdit              ``infdit/mp_rank_00_model_states.pt``                            SAT/DeepSpeed pickle,
                                                                                     ``module`` + CLIP tower
                                                                                     + every DeepSpeed/SAT
                                                                                     entry, bf16
sana_1024           ``diffusion_models/Sana_1600M_1024px_BF16.pth``                  ``{"state_dict": ...}``,
                                                                                     original keys, bf16
sana_4k             ``diffusion_models/Sana_1600M_4Kpx_BF16.pth``                    same, sincos pos_embed
sana_4800m          ``diffusion_models/SANA1.5_4.8B_1024px_BF16.pth``                same, 60 blocks,
                                                                                     qk/cross norm (9.4 GB)
sana_diffusers      ``diffusion_models/Sana_1600M_1024px_BF16_diffusers/transformer/``  2 safetensors shards
                                                                                     + index + config.json
gemma_folder        ``text_encoders/gemma-2-2b-it/``                                 2 shards + index +
                                                                                     config + tokenizer, bf16
gemma_single        ``text_encoders/gemma_2_2b_fp16.safetensors``                    ComfyUI's single file:
                                                                                     ``model.*`` + spiece_model
dcae                ``vae/dc-ae-f32c32-sana-1.1.safetensors``                        efficientvit keys, fp32
==================  ===============================================================  =====================

Each file (or folder) gets ``<name>.manifest.json`` beside it (format, dtype, size, every key with shape and dtype), and
``manifest.json`` in the output folder lists them all.

Weights are random but scaled like trained ones (matrices 1/sqrt(fan-in), norm weights near 1), so the
full-size forward smoke (``bench load --forward``) sees realistic activation ranges. Every tensor is drawn
from a generator seeded by its key, so files are reproducible and independent of write order.

Tokenizers: the real Gemma tokenizer (a 4 MB sentencepiece model of 256k pieces) cannot be downloaded here, so
the folder and the single file carry the tests' small real sentencepiece model (400 pieces, Gemma's special-token
ids; ``tests/tiny_sana_te_vae.py``). It tokenises any prompt into ids < 400, which the 256k-row embedding accepts.

Memory: safetensors files are streamed tensor by tensor (peak: one tensor); the two pickles are built in memory in
bf16 first (peak ~3.3 GB for Sana, ~2.6 GB for Inf-DiT), because ``torch.save`` needs the whole dict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from uniba.publish import publish  # noqa: E402 - after the repository is on the path

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
Maker = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
              torch.int64: "I64", torch.int32: "I32"}

GEMMA_2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=8192,
    sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6,
    rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
)


# ----------------------------------------------------------------------------------------------------------------
# random weights, one tensor at a time


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def scaled_random(seed: int) -> Maker:
    """Random tensors scaled like trained weights, decided by key name and shape."""

    def make(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        gen = _generator(seed, key)
        draw = torch.randn(shape, generator=gen, dtype=torch.float32)
        leaf = key.rsplit(".", 1)[-1]
        if any(s in key for s in ("pos_emb", "position_emb", "positional_emb", "_pos", "re_pos")):
            draw.mul_(0.5)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:]) if "embed_tokens" not in key and "token_embedding" not in key else shape[1]
            draw.mul_(1.0 / math.sqrt(max(fan_in, 1)))
            if "adaln" in key.lower() or "adaLN" in key or "scale_shift_table" in key or "t_block" in key:
                draw.mul_(0.5)
        elif "norm" in key or ".ln_" in key or key.startswith("ln_") or leaf in ("gamma", "beta"):
            if key.startswith("model."):
                draw.mul_(0.2)  # Gemma's RMSNorm multiplies by (1 + w)
            elif leaf in ("weight", "gamma"):
                draw.mul_(0.2).add_(1.0)
            else:
                draw.mul_(0.2)
        elif leaf == "bias":
            draw.mul_(0.05)
        else:
            draw.mul_(0.5)
        return draw.to(dtype)

    return make


# ----------------------------------------------------------------------------------------------------------------
# writers


def write_safetensors_streaming(path: Path, spec: Spec, make: Maker, metadata: dict[str, str] | None = None,
                                fixed: dict[str, torch.Tensor] | None = None) -> None:
    """A safetensors file written tensor by tensor (never the whole dict in memory); atomic."""
    fixed = fixed or {}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, (shape, dtype) in spec.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for key, (shape, dtype) in spec.items():
                tensor = fixed[key] if key in fixed else make(key, shape, dtype)
                assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, key
                fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
                del tensor

    publish(path, write, overwrite=True)


def write_sharded(folder: Path, stem: str, spec: Spec, make: Maker, max_shard_bytes: int,
                  fixed: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Hugging Face sharding: ``<stem>-0000i-of-0000n.safetensors`` + ``<stem>.safetensors.index.json``."""
    shards: list[Spec] = [{}]
    size = 0
    total = 0
    for key, (shape, dtype) in spec.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = (shape, dtype)
        size += nbytes
        total += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    paths = []
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors_streaming(folder / name, shard, make, metadata={"format": "pt"}, fixed=fixed)
        weight_map.update({k: name for k in shard})
        paths.append(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def torch_save_atomic(obj: object, path: Path) -> None:
    publish(path, lambda tmp: torch.save(obj, tmp), overwrite=True)


def write_manifest(path: Path, fmt: str, entries: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   extra: dict[str, object] | None = None) -> dict[str, object]:
    """``<file>.manifest.json``: what the file holds (for readers and for the load benchmark's size figure)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    size = sum(f.stat().st_size for f in files)
    dtypes = sorted({str(d).removeprefix("torch.") for _, d in entries.values()})
    manifest = {
        "file": path.name, "format": fmt, "size_bytes": size, "dtypes": dtypes, "tensors": len(entries),
        "elements": sum(math.prod(s) for s, _ in entries.values()),
        "keys": {k: [list(s), str(d).removeprefix("torch.")] for k, (s, d) in entries.items()},
        **(extra or {}),
    }
    path.with_name(path.name + ".manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# the formats


def _meta_shapes(module_factory: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = module_factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def make_infdit(out: Path, seed: int) -> dict[str, object]:
    """The SAT/DeepSpeed ``mp_rank_00_model_states.pt``: SAT keys under ``module``, CLIP tower, RoPE tables, bf16."""
    from tests.tiny_infdit import deepspeed_model_states, rope_buffers
    from uniba.infdit.config import release_config
    from uniba.infdit.keys import ours_to_sat
    from uniba.infdit.model import InfDiT

    config = release_config(with_clip=True)
    make = scaled_random(seed)
    bf16 = torch.bfloat16
    module: dict[str, torch.Tensor] = {}
    for key, shape in _meta_shapes(lambda: InfDiT(config)).items():
        module[ours_to_sat(key)] = make(key, shape, bf16)
    cos, sin = rope_buffers(config)  # the release stores the (1024, 1024, 80) tables, bf16 like everything else
    module["mixins.adaln_layer.rope.freqs_cos"] = cos.to(bf16)
    module["mixins.adaln_layer.rope.freqs_sin"] = sin.to(bf16)
    del cos, sin
    for n in range(config.num_layers):  # dead in the reference forward, present in the file
        module[f"mixins.adaln_layer.k_layer_norm.{n}.weight"] = torch.ones(config.head_dim, dtype=bf16)
        module[f"mixins.adaln_layer.k_layer_norm.{n}.bias"] = torch.zeros(config.head_dim, dtype=bf16)
    module["transformer.position_embeddings.weight"] = make("transformer.position_embeddings.weight",
                                                            (256, config.hidden_size), bf16)
    # open_clip's text-side leftovers that SAT keeps in image_encoder.model (ViT-L-14: width 768, 49408 tokens)
    for key, shape in (("token_embedding.weight", (49408, 768)), ("positional_embedding", (77, 768)),
                       ("text_projection", (768, 768)), ("logit_scale", ())):
        module["image_encoder.model." + key] = make("image_encoder.model." + key, shape, bf16)
    folder = out / "infdit"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mp_rank_00_model_states.pt"
    entries = {k: (tuple(v.shape), v.dtype) for k, v in module.items()}
    states = deepspeed_model_states(module)
    states["args"].seed = seed
    torch_save_atomic(states, path)
    del states, module
    return write_manifest(path, "SAT/DeepSpeed model states (module + DeepSpeed/SAT entries)", entries,
                          {"extra_top_level_keys": sorted(k for k in deepspeed_model_states({}) if k != "module")})


def _sana_diffusers_state_spec(name: str) -> tuple[object, dict[str, tuple[int, ...]]]:
    from uniba.sana.config import RELEASES
    from uniba.sana.model import SanaDiT

    config = RELEASES[name]
    return config, _meta_shapes(lambda: SanaDiT(config))


def make_sana_original(out: Path, seed: int, release: str, file_name: str) -> dict[str, object]:
    """The original ``.pth``: ``{"state_dict": ...}`` with SANA keys, the ``pos_embed`` and null-caption buffers."""
    from uniba.sana.keys import ours_to_original
    from uniba.sana.model import sincos_position_embedding

    config, shapes = _sana_diffusers_state_spec(release)
    make = scaled_random(seed)
    bf16 = torch.bfloat16
    ours = {k: make(k, s, bf16) for k, s in shapes.items()}
    state = ours_to_original(ours)
    del ours
    base = config.pe_base_size
    if config.use_pe:
        table = sincos_position_embedding(config.hidden_size, base, base, base, config.pe_interpolation,
                                          torch.device("cpu"), torch.float32)
        state["pos_embed"] = table.reshape(1, base * base, config.hidden_size).to(bf16)
    else:
        state["pos_embed"] = torch.zeros(1, base * base, config.hidden_size, dtype=bf16)
    state["y_embedder.y_embedding"] = make("y_embedder.y_embedding", (300, config.caption_channels), bf16)
    folder = out / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    entries = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    torch_save_atomic({"state_dict": state}, path)
    del state
    return write_manifest(path, "SANA original .pth ({'state_dict': ...})", entries, {"release": release})


def make_sana_diffusers(out: Path, seed: int) -> dict[str, object]:
    """``<name>_diffusers/transformer/``: config.json + 2 bf16 safetensors shards + index (diffusers key names)."""
    from uniba.sana.config import diffusers_config_dict

    config, shapes = _sana_diffusers_state_spec("Sana_1600M_1024px")
    folder = out / "diffusion_models" / "Sana_1600M_1024px_BF16_diffusers" / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    spec = {k: (s, torch.bfloat16) for k, s in shapes.items()}
    cfg = {"_class_name": "SanaTransformer2DModel", "_diffusers_version": "0.32.0", **diffusers_config_dict(config)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_sharded(folder, "diffusion_pytorch_model", spec, scaled_random(seed), max_shard_bytes=2 * 10**9)
    return write_manifest(folder, "diffusers transformer folder (sharded safetensors + index)", spec)


def _gemma_spec(dtype: torch.dtype) -> Spec:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(**GEMMA_2_2B)
    shapes = _meta_shapes(lambda: Gemma2Model(config))
    return {"model." + k: (s, dtype) for k, s in shapes.items()}


def make_gemma_folder(out: Path, seed: int) -> dict[str, object]:
    """``gemma-2-2b-it/`` as on Hugging Face: config, 2 shards + index, tokenizer files (small real tokenizer)."""
    from transformers import GemmaTokenizer

    from tests.tiny_sana_te_vae import tiny_spiece_model

    folder = out / "text_encoders" / "gemma-2-2b-it"
    folder.mkdir(parents=True, exist_ok=True)
    spec = _gemma_spec(torch.bfloat16)
    config = dict(GEMMA_2_2B, model_type="gemma2", architectures=["Gemma2ForCausalLM"], torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_sharded(folder, "model", spec, scaled_random(seed), max_shard_bytes=4_988_000_000)
    (folder / "tokenizer.model").write_bytes(tiny_spiece_model())
    GemmaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False).save_pretrained(str(folder))
    return write_manifest(folder, "Hugging Face folder (sharded safetensors + index + tokenizer)", spec,
                          {"tokenizer": "small real sentencepiece model (400 pieces), not Gemma's 256k"})


def make_gemma_single(out: Path, seed: int) -> dict[str, object]:
    """ComfyUI's single file (Lumina 2 repackaged ``gemma_2_2b_fp16.safetensors``): ``model.*`` + ``spiece_model``."""
    from tests.tiny_sana_te_vae import tiny_spiece_model

    folder = out / "text_encoders"
    folder.mkdir(parents=True, exist_ok=True)
    spec = _gemma_spec(torch.float16)
    spiece = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    spec["spiece_model"] = (tuple(spiece.shape), torch.uint8)
    path = folder / "gemma_2_2b_fp16.safetensors"
    write_safetensors_streaming(path, spec, scaled_random(seed), metadata={"format": "pt"},
                                fixed={"spiece_model": spiece})
    return write_manifest(path, "ComfyUI single-file Gemma-2 (model.* + spiece_model)", spec)


def make_dcae(out: Path, seed: int) -> dict[str, object]:
    """``mit-han-lab/dc-ae-f32c32-sana-1.1`` ``model.safetensors`` (efficientvit keys), renamed as the README says."""
    from uniba.dcae import keys as dcae_keys
    from uniba.dcae.config import DCAEConfig
    from uniba.dcae.model import DCAE

    config = DCAEConfig.sana_f32c32()
    shapes = _meta_shapes(lambda: DCAE(config))
    # Key renaming needs tensors; map a dict of meta tensors to learn the original names and shapes.
    original = dcae_keys.diffusers_to_original({k: torch.empty(s, device="meta") for k, s in shapes.items()},
                                               downsample=config.downsample)
    spec = {k: (tuple(v.shape), torch.float32) for k, v in original.items()}
    folder = out / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dc-ae-f32c32-sana-1.1.safetensors"
    write_safetensors_streaming(path, spec, scaled_random(seed), metadata={"format": "pt"})
    return write_manifest(path, "DC-AE efficientvit model.safetensors", spec)


FORMATS: dict[str, Callable[[Path, int], dict[str, object]]] = {
    "infdit": make_infdit,
    "sana_1024": lambda out, seed: make_sana_original(out, seed, "Sana_1600M_1024px", "Sana_1600M_1024px_BF16.pth"),
    "sana_4k": lambda out, seed: make_sana_original(out, seed, "Sana_1600M_4Kpx", "Sana_1600M_4Kpx_BF16.pth"),
    "sana_4800m": lambda out, seed: make_sana_original(out, seed, "SANA1.5_4.8B_1024px",
                                                       "SANA1.5_4.8B_1024px_BF16.pth"),
    "sana_diffusers": make_sana_diffusers,
    "gemma_folder": make_gemma_folder,
    "gemma_single": make_gemma_single,
    "dcae": make_dcae,
}


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (outside the repository; ~24 GB)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(FORMATS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FORMATS)
    unknown = sorted(set(names) - set(FORMATS))
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out = args.out.resolve()
    if out == REPO or REPO in out.parents:
        parser.error(f"{out} is inside the repository; write the multi-GB files elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "manifest.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for name in names:
        start = time.perf_counter()
        manifest = FORMATS[name](out, args.seed)
        index[name] = {k: manifest[k] for k in ("file", "format", "size_bytes", "dtypes", "tensors", "elements")}
        index_path.write_text(json.dumps(index, indent=1))
        print(f"{name:15s} {manifest['file']:40s} {manifest['size_bytes'] / 2**30:6.2f} GiB  "
              f"{manifest['tensors']:5d} tensors  {time.perf_counter() - start:6.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
