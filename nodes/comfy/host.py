"""What every node needs from ComfyUI, in host-neutral words, with a plain-torch fallback for each.

Devices and dtypes, free memory, wrapping our ``nn.Module`` models in ComfyUI's ``ModelPatcher``,
progress and Cancel, model folders, server routes and the out-of-memory test. The ComfyUI imports
are guarded, so the pack imports and runs headless too (tqdm progress, no-op Cancel, free RAM as
the budget, ``UNIBA_MODELS_DIR`` as the model folder).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import psutil
import torch
from PIL import Image

from uniba.devices import DtypeSupport, default_device, torch_dtype_support
from uniba.memory import device_free_bytes, is_out_of_memory
from uniba.progress import TerminalProgress

log = logging.getLogger("uniba")

PACK_NAME = "ComfyUI-UniBA"

try:  # pragma: no cover - exercised in the integration tier
    import comfy.model_management as _mm
    import comfy.model_patcher as _model_patcher
    import comfy.utils as _cu
    import folder_paths as _fp
except Exception:  # noqa: BLE001 - any failure means "not inside a usable ComfyUI"
    _mm = None
    _model_patcher = None
    _cu = None
    _fp = None

IN_COMFYUI = _mm is not None

# Our own model folder (Inf-DiT); Sana uses the standard ComfyUI folders.
INFDIT_FOLDER = "infdit"
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin"}


class NeedsComfyUI(RuntimeError):
    """Something only ComfyUI can do (a SAMPLER, ComfyUI's sampling, UNet hooks) was asked for headless."""


def require_comfyui(what: str) -> None:
    if not IN_COMFYUI:
        raise NeedsComfyUI(f"{what} runs inside ComfyUI only; headless, use the engine (python -m uniba, the "
                           "uniba package).")


# --------------------------------------------------------------------------- devices and dtypes

def torch_device() -> torch.device:
    """The compute device ComfyUI chose (``--cpu`` honoured), else CUDA, MPS or CPU."""
    return _mm.get_torch_device() if IN_COMFYUI else default_device()


def offload_device() -> torch.device:
    """Where idle models wait (CPU unless ComfyUI runs with ``--gpu-only``/``--highvram``)."""
    return _mm.unet_offload_device() if IN_COMFYUI else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE/LATENT outputs live between nodes."""
    return _mm.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def text_encoder_device() -> torch.device:
    """Where Gemma-2 runs. ``--lowvram``/``--novram`` keep it on the offload device: newer hosts answer the
    GPU for text encoders whenever Dynamic VRAM is on, which would force a 5 GB encoder onto a small card."""
    if not IN_COMFYUI:
        return torch_device()
    low = tuple(getattr(_mm.VRAMState, name) for name in ("LOW_VRAM", "NO_VRAM") if hasattr(_mm.VRAMState, name))
    gpu_only = bool(getattr(getattr(_mm, "args", None), "gpu_only", False))
    if _mm.vram_state in low and not gpu_only:
        return _mm.text_encoder_offload_device()
    return _mm.text_encoder_device()


def vae_device() -> torch.device:
    return _mm.vae_device() if IN_COMFYUI else torch_device()


def vae_offload_device() -> torch.device:
    return _mm.vae_offload_device() if IN_COMFYUI else torch.device("cpu")


def dtype_support(device: torch.device) -> DtypeSupport:
    """Whether ``device`` computes bf16/fp16 usefully: ComfyUI's answer (its flags and device tables), else
    torch's; :func:`uniba.devices.choose_dtype` turns it into the dtype."""
    if not IN_COMFYUI:
        return torch_dtype_support(device)
    return DtypeSupport(bf16=bool(_mm.should_use_bf16(device)), fp16=bool(_mm.should_use_fp16(device)))


# --------------------------------------------------------------------------- memory

def free_memory(device: torch.device | None = None, patcher: Any = None) -> int:
    """Free bytes on the device: ComfyUI's figure, else ``cuda.mem_get_info``, else available RAM.

    With the patcher of the model about to run, hosts with Dynamic VRAM also count the VRAM they can reclaim
    from paged-in weights (``patcher.get_free_memory``), as core does for its own batches and VAE tiles.
    """
    device = device or torch_device()
    if IN_COMFYUI:
        own_figure = getattr(patcher, "get_free_memory", None)
        return int(own_figure(device) if own_figure is not None else _mm.get_free_memory(device))
    return device_free_bytes(device)


def total_memory(device: torch.device | None = None) -> int:
    """All memory of the device (what could ever be free): ComfyUI's figure, else CUDA's, else the RAM."""
    device = device or torch_device()
    if IN_COMFYUI and hasattr(_mm, "get_total_memory"):
        return int(_mm.get_total_memory(device))
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)


def is_oom(exc: BaseException) -> bool:
    """The host's own test first: ``model_management.is_oom`` also recognises ``torch.AcceleratorError`` and
    clears the queued CUDA error before the retry; older hosts: their ``OOM_EXCEPTION``. Then the engine's own
    detection (the CPU allocator's failure, which neither knows)."""
    if IN_COMFYUI:
        try:
            host_check = _mm.is_oom
        except AttributeError:  # hosts before it (0.3.x)
            host_check = None
        if host_check is not None:
            if host_check(exc):
                return True
        elif _mm.OOM_EXCEPTION is not Exception and isinstance(exc, _mm.OOM_EXCEPTION):
            return True
    return is_out_of_memory(exc)


def soft_empty_cache() -> None:
    if IN_COMFYUI:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- model management

class HeadlessPatcher:
    """Stand-in for ComfyUI's ``ModelPatcher`` outside the host: holds the module and its devices."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> None:
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device

    def model_size(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def wrap_model(model: torch.nn.Module, load_device: torch.device | None = None,
               offload: torch.device | None = None) -> Any:
    """Wrap a model so ComfyUI's manager loads and evicts it like its own (the one way the pack makes patchers).

    Our engine models, transformers' Gemma and ComfyUI ``BaseModel`` subclasses all go through here,
    so the patcher's ``model.device`` assignment is dealt with in one place.
    """
    load_device = load_device or torch_device()
    offload = offload or offload_device()
    if IN_COMFYUI:
        _allow_device_assignment(model)
        # the host's patcher for its own models: ModelPatcherDynamic where Dynamic VRAM is on (weights paged in
        # on demand, no forced eviction of core models), the legacy ModelPatcher elsewhere
        try:
            patcher_class = _model_patcher.CoreModelPatcher
        except AttributeError:  # hosts before Dynamic VRAM
            patcher_class = _model_patcher.ModelPatcher
        patcher = patcher_class(model, load_device=load_device, offload_device=offload)
        if hasattr(patcher, "cached_patcher_init"):
            # core's reload factory: a non-dynamic twin (clone(disable_dynamic=True), hooked conds) shares the
            # module, a multi-GPU deep clone (deepclone_multigpu, no disable_dynamic) gets a copy of its own
            patcher.cached_patcher_init = (_legacy_patcher, (model, load_device, offload))
        return patcher
    patcher = HeadlessPatcher(model.to(offload), load_device, offload)
    _HEADLESS_PATCHERS.add(patcher)
    return patcher


_HEADLESS_PATCHERS: weakref.WeakSet[HeadlessPatcher] = weakref.WeakSet()  # what loaded_modules() looks at headless


def _legacy_patcher(model: torch.nn.Module, load_device: torch.device, offload: torch.device,
                    disable_dynamic: bool | None = None) -> Any:
    """``cached_patcher_init``'s factory. ``clone(disable_dynamic=True)`` passes the flag and gets a legacy
    patcher on the same module; ``deepclone_multigpu`` calls it bare and gets a deep copy (on the offload
    device, where the module rests), so the clone another GPU loads never moves the primary's weights."""
    if disable_dynamic is None:
        # a BaseModel's model_config is a description, not weights (and core's config classes do not deepcopy)
        config = getattr(model, "model_config", None)
        model = copy.deepcopy(model, memo={} if config is None else {id(config): config})
    return _model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload)


def is_dynamic(patcher: Any) -> bool:
    """Whether the patcher pages weights in on demand (Dynamic VRAM); never for the legacy patcher."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if check is not None else False


_SETTABLE_DEVICE: dict[type, type] = {}


def _allow_device_assignment(model: torch.nn.Module) -> None:
    """ComfyUI's ModelPatcher assigns ``model.device`` when it moves a model; a read-only ``device``
    property (ours, transformers') would raise, so such a model gets a subclass whose setter ignores it
    (the property still reports where the parameters are)."""
    cls = type(model)
    prop = getattr(cls, "device", None)
    if not isinstance(prop, property) or prop.fset is not None:
        return
    if cls not in _SETTABLE_DEVICE:
        _SETTABLE_DEVICE[cls] = type(cls.__name__, (cls,), {
            "device": property(prop.fget, lambda self, value: None, doc=prop.__doc__),
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    model.__class__ = _SETTABLE_DEVICE[cls]


def load_to_device(patcher: Any, memory_required: int = 0) -> torch.nn.Module:
    """Move a wrapped model to its compute device (evicting others if needed) and return the module."""
    if IN_COMFYUI:
        # a dynamic patcher refuses full loads (it pages weights in during the forward); legacy ones load whole
        _mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=not is_dynamic(patcher))
        return patcher.model
    patcher.model.to(patcher.load_device)
    return patcher.model


def is_loaded(patcher: Any) -> bool:
    """Whether a wrapped model's weights are on its compute device now, so a free-memory figure excludes them."""
    if IN_COMFYUI:
        return any(getattr(loaded, "model", None) is patcher for loaded in list(_mm.current_loaded_models))
    first = next(patcher.model.parameters(), None)
    return first is not None and first.device.type == torch.device(patcher.load_device).type


def loaded_modules() -> list[torch.nn.Module]:
    """The modules of the models held on their compute device now (headless: the live patchers' that are)."""
    if not IN_COMFYUI:
        return [p.model for p in list(_HEADLESS_PATCHERS) if is_loaded(p)]
    patchers = [getattr(loaded, "model", None) for loaded in list(_mm.current_loaded_models)]
    return [p.model for p in patchers if p is not None and getattr(p, "model", None) is not None]


def offload(patcher: Any) -> None:
    """Let the model go back to its offload device (ComfyUI does this lazily when room is needed)."""
    if not IN_COMFYUI:
        patcher.model.to(patcher.offload_device)


# --------------------------------------------------------------------------- progress and cancel

def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op headless)."""
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()


def _to_pil(preview: torch.Tensor) -> Any:
    img = preview.detach().float().cpu()
    if img.ndim == 4:
        img = img[0]
    if img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):  # CHW -> HWC
        img = img.movedim(0, -1)
    array = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


class Progress:
    """Progress reporter for the engine's ``progress(done, total, preview)`` callback.

    Inside ComfyUI it drives the node's progress bar and preview image and checks Cancel on
    every update; headless it prints a tqdm bar. ``preview`` is an image tensor in [0, 1]
    (CHW, HWC or NCHW) or ``None``.
    """

    MAX_PREVIEW = 512

    def __init__(self, total: int, node_id: str | None = None, desc: str = "") -> None:
        self.total = total
        self._bar = _cu.ProgressBar(total, node_id=node_id) if IN_COMFYUI else None
        self._terminal = None if IN_COMFYUI else TerminalProgress(total, desc or PACK_NAME, leave=False)

    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None:
        check_interrupt()
        if total is not None:
            self.total = total
        if self._bar is not None:
            shown = ("JPEG", _to_pil(preview), self.MAX_PREVIEW) if preview is not None else None
            self._bar.update_absolute(done, self.total, shown)
        elif self._terminal is not None:
            self._terminal(done, self.total)

    def check_cancel(self) -> None:
        """Cancel point inside a unit of work (:func:`uniba.progress.check_cancel`): no bar update."""
        check_interrupt()

    def close(self) -> None:
        if self._terminal is not None:
            self._terminal.close()


# --------------------------------------------------------------------------- warnings the user must see

# The server event web/js/uniba_warnings.js shows as a toast in the browser.
WARNING_EVENT = "uniba.warning"


def warn(message: str, node_id: str | None = None) -> None:
    """Something the user must know (a result that differs from what was asked): in the log, and inside
    ComfyUI also as a warning toast in the browser of the client that queued the prompt."""
    log.warning("%s", message)
    if not IN_COMFYUI:
        return
    try:
        instance = _prompt_server()
        instance.send_sync(WARNING_EVENT, {"message": message, "node": node_id}, getattr(instance, "client_id", None))
    except Exception:  # noqa: BLE001 - no server (scripts, tests): the log line is all there is
        log.debug("could not send the warning to the browser", exc_info=True)


def _prompt_server() -> Any:
    import server  # optional dependency (ComfyUI's server): absent in tests and scripts

    return server.PromptServer.instance


@contextlib.contextmanager
def engine_warnings(node_id: str | None = None) -> Iterator[None]:
    """Show the engine's warnings (``warnings.warn`` with a ``uniba`` warning class) through :func:`warn` while
    a node runs, every time (not once per place); other warnings go on as they would have."""
    recorded: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                recorded = list(caught)
    finally:  # also when the node fails afterwards: what was said before still holds
        shown: set[str] = set()
        for item in recorded:
            if item.category.__module__.split(".")[0] == "uniba":
                if str(item.message) not in shown:  # a check run twice (node, then engine) says it once
                    shown.add(str(item.message))
                    warn(str(item.message), node_id)
            else:
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


@contextlib.contextmanager
def loading(what: str, node_id: str | None = None) -> Iterator[Progress]:
    """Progress for reading a model's weights (one step per tensor), with Cancel between tensors."""
    check_interrupt()
    progress = Progress(1, node_id=node_id, desc=what)
    try:
        yield progress
    finally:
        progress.close()


# --------------------------------------------------------------------------- model folders

def register_model_folders() -> None:
    """Register ``models/infdit/`` with ComfyUI (keeping any ``extra_model_paths.yaml`` entry)."""
    if not IN_COMFYUI:
        return
    default = os.path.join(_fp.models_dir, INFDIT_FOLDER)
    os.makedirs(default, exist_ok=True)
    entry = _fp.folder_names_and_paths.setdefault(INFDIT_FOLDER, ([default], set(MODEL_EXTENSIONS)))
    if default not in entry[0]:
        entry[0].append(default)


def _headless_dirs(folder: str) -> list[str]:
    root = os.environ.get("UNIBA_MODELS_DIR", os.path.join(os.getcwd(), "models"))
    return [os.path.join(root, folder)]


def list_models(folder: str) -> list[str]:
    """File names in a model folder (``infdit``, ``diffusion_models``, ``vae``, ``text_encoders``)."""
    if IN_COMFYUI:
        return list(_fp.get_filename_list(folder))
    names: list[str] = []
    for base in _headless_dirs(folder):
        if os.path.isdir(base):
            for dirpath, _dirs, files in os.walk(base):
                for f in files:
                    if os.path.splitext(f)[1].lower() in MODEL_EXTENSIONS:
                        names.append(os.path.relpath(os.path.join(dirpath, f), base))
    return sorted(names)


def list_model_dirs(folder: str, marker: str = "config.json") -> list[str]:
    """Sub-folders of a model folder holding ``marker`` (Hugging Face model folders such as a Gemma download;
    ``model_index.json`` for whole diffusers pipeline folders)."""
    bases = _fp.get_folder_paths(folder) if IN_COMFYUI else _headless_dirs(folder)
    found = []
    for base in bases:
        if os.path.isdir(base):
            found += [d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, marker))]
    return sorted(set(found))


def _inside(name: str) -> bool:
    """A name that stays inside its model folder: relative, no ``..`` component (symlinked files are fine)."""
    normal = os.path.normpath(name.replace("\\", "/"))
    return bool(name) and not os.path.isabs(name) and not os.path.splitdrive(name)[0] \
        and normal != ".." and not normal.startswith("../")


def model_path(folder: str, name: str, *, listed_only: bool = False) -> str:
    """Full path of a file or sub-folder chosen in a loader node; a clear error if it is not there.

    Only names inside the folder are looked up: an absolute path or a ``..`` gets the same
    ``FileNotFoundError`` as a missing file, so a prompt or a route cannot reach other files.
    ``listed_only`` also requires a name the folder's listing (:func:`list_models`) shows.
    """
    bases = _fp.get_folder_paths(folder) if IN_COMFYUI else _headless_dirs(folder)
    if _inside(name) and (not listed_only or name in list_models(folder)):
        for base in bases:
            candidate = os.path.join(base, name)
            if os.path.exists(candidate):
                return candidate
    raise FileNotFoundError(
        f"{name!r} is not in the '{folder}' model folder ({', '.join(bases) or 'none registered'}). "
        f"Put the file into models/{folder}/ and press 'Refresh' in ComfyUI."
    )


# --------------------------------------------------------------------------- server routes

def add_route(method: str, path: str, handler: Callable[..., Any]) -> bool:
    """Register an aiohttp handler on ComfyUI's server; False when there is no server (tests, CLI)."""
    if not IN_COMFYUI:
        return False
    try:
        import server  # optional dependency (ComfyUI's server): absent in tests and scripts

        routes = server.PromptServer.instance.routes
    except (ImportError, AttributeError):  # ComfyUI's modules without its server (tests, scripts)
        return False
    getattr(routes, method.lower())(path)(handler)
    return True


# --------------------------------------------------------------------------- samplers

class _EdmModelSampling:
    """ComfyUI's ``model_sampling`` facts for an EDM denoiser (sigma in, denoised image out).

    Some ComfyUI samplers read them: half-log-SNR is -log sigma for anything that is not a flow
    model (``CONST``), noise scaling adds ``sigma * noise``.
    """

    def __init__(self, sigma_min: float, sigma_max: float, sigma_data: float) -> None:
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (4 * timestep).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(log_max - percent * (log_max - log_min))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise: bool = False):
        return latent_image + noise * sigma

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class _KDiffusionModel:
    """A denoiser as ComfyUI's samplers see a model: callable, with ``model_sampling`` where they look
    (``model.inner_model.inner_model.model_sampling`` and the patcher's ``get_model_object``)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], sampling: _EdmModelSampling) -> None:
        self.denoiser = denoiser
        patcher = SimpleNamespace(get_model_object=lambda name: sampling if name == "model_sampling" else None)
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling), model_patcher=patcher,
                                           model_sampling=sampling)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        return self.denoiser(x, sigma, **extra_args)


def sampler_named(name: str) -> Any:
    """The SAMPLER ComfyUI's KSamplerSelect gives for ``name``; a ValueError naming the choices otherwise."""
    require_comfyui("a ComfyUI sampler by name")
    import comfy.samplers  # optional dependency (ComfyUI): imported only when running inside it

    names = list(comfy.samplers.KSampler.SAMPLERS)
    if name not in names:
        raise ValueError(f"sampler must be one of ComfyUI's samplers ({', '.join(names)}), got {name[:40]!r}")
    return comfy.samplers.sampler_object(name)


class k_diffusion_sampler:  # noqa: N801 - used like a function
    """A ComfyUI SAMPLER (``KSAMPLER``: ``sampler_function`` + ``extra_options``) as a plain k-diffusion
    sampler ``sample(model, x, sigmas, extra_args, callback, disable)`` for an EDM denoiser.

    Read through the KSAMPLER's plain attributes; ``__wrapped__`` exposes the function's signature
    (whether it takes a ``noise_sampler``) to the engine, which then passes its seeded CPU noise.
    """

    def __init__(self, sampler: Any, *, sigma_min: float, sigma_max: float, sigma_data: float) -> None:
        function = getattr(sampler, "sampler_function", None)
        if function is None:
            if not callable(sampler):
                raise ValueError(f"the sampler input must be a ComfyUI SAMPLER (KSamplerSelect), got "
                                 f"{type(sampler).__name__}")
            function = sampler
        if "cfg_pp" in getattr(function, "__name__", ""):
            raise ValueError(f"the sampler {function.__name__.removeprefix('sample_')} is a CFG++ sampler: it needs "
                             "classifier-free guidance, which this model does not use; pick its plain variant "
                             "(e.g. euler instead of euler_cfg_pp)")
        self.function = function
        self.options = dict(getattr(sampler, "extra_options", None) or {})
        self.sampling = _EdmModelSampling(sigma_min, sigma_max, sigma_data)
        self.__wrapped__ = function

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        return self.function(_KDiffusionModel(model, self.sampling), x, sigmas, extra_args=extra_args,
                             callback=callback, disable=disable, **{**self.options, **kwargs})
