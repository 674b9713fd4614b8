"""Integration tier: a real ComfyUI, booted in-process on the CPU, with this pack as a custom node.

Needs a ComfyUI checkout at ``COMFYUI_DIR`` (see README, "Tests"); without it every test here is
skipped with one reason. Test modules must not import ``comfy``/``nodes`` at module level: use the
``comfy_host`` fixture, which puts ComfyUI on ``sys.path`` and boots it once per session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-UniBA"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
MODEL_FOLDERS = ("infdit", "diffusion_models", "vae", "text_encoders", "checkpoints", "controlnet", "loras")

SKIP_REASON = ("COMFYUI_DIR is not set: the integration tier needs a ComfyUI checkout "
               "(export COMFYUI_DIR=/path/to/ComfyUI; see README, Tests)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if COMFYUI_DIR and Path(COMFYUI_DIR, "main.py").is_file():
        return
    reason = SKIP_REASON if not COMFYUI_DIR else f"COMFYUI_DIR={COMFYUI_DIR} has no main.py"
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class ComfyHost:
    """A booted ComfyUI: its node registry, its modules and the temporary folders it uses."""

    root: Path
    base_dir: Path
    models_dir: Path
    output_dir: Path
    input_dir: Path
    nodes: dict[str, type]
    pack_module: Any
    pack_node_names: list[str]
    modules: dict[str, Any] = field(default_factory=dict)

    def model_folder(self, name: str) -> Path:
        return self.models_dir / name


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory: pytest.TempPathFactory) -> ComfyHost:
    root = Path(COMFYUI_DIR).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(str(root)):
        pytest.fail("a module named 'nodes' that is not ComfyUI's was imported before the integration tier")

    # ComfyUI's main.py imports its ``utils`` package before ``nodes`` puts comfy/ (with a utils.py)
    # first on sys.path; do the same so comfy_extras that import utils.install_util load.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    args.disable_all_custom_nodes = True
    args.whitelist_custom_nodes = [PACK_FOLDER]
    args.disable_api_nodes = True

    base = tmp_path_factory.mktemp("comfyui")
    custom = base / "custom_nodes"
    custom.mkdir()
    (custom / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    models = base / "models"
    output, inputs, temp = base / "output", base / "input", base / "temp"
    for d in (output, inputs, temp):
        d.mkdir()

    import folder_paths

    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    for name in MODEL_FOLDERS:
        (models / name).mkdir(parents=True)
        folder_paths.add_model_folder_path(name, str(models / name), is_default=True)
    folder_paths.set_output_directory(str(output))
    folder_paths.set_input_directory(str(inputs))
    folder_paths.set_temp_directory(str(temp))

    import nodes

    logging.getLogger().setLevel(logging.WARNING)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    # our pack registers models/infdit at import; keep the temporary folder first
    folder_paths.add_model_folder_path("infdit", str(models / "infdit"), is_default=True)

    if PACK_FOLDER not in nodes.LOADED_MODULE_DIRS:
        pytest.fail(f"ComfyUI failed to import the pack {PACK_FOLDER} (see the log above)")
    module_name = str(custom / PACK_FOLDER).replace(".", "_x_")
    pack = sys.modules[module_name]
    names = sorted(pack.NODE_CLASS_MAPPINGS)
    return ComfyHost(root=root, base_dir=base, models_dir=models, output_dir=output, input_dir=inputs,
                     nodes=nodes.NODE_CLASS_MAPPINGS, pack_module=pack, pack_node_names=names,
                     modules={"nodes": nodes, "folder_paths": folder_paths})


@dataclass
class PromptResult:
    """What a finished prompt produced: UI outputs per node and the cached Python outputs per node."""

    ui: dict[str, Any]
    outputs: dict[str, Any]
    messages: list[tuple[str, Any]]


@pytest.fixture(scope="session")
def run_prompt(comfy_host: ComfyHost):
    """Run an API-format prompt in-process and return its outputs; raise with the node errors on failure.

    ``preview_method`` (e.g. "latent2rgb") turns sampler previews on for this prompt only. Executor details
    that differ between ComfyUI releases are handled in ``executor_adapter`` and nowhere else.
    """
    import execution

    def run(prompt: dict[str, Any], *, refresh_model_lists: bool = True,
            preview_method: str | None = None) -> PromptResult:
        if refresh_model_lists:
            import folder_paths

            folder_paths.filename_list_cache.clear()
        prompt_id = uuid.uuid4().hex
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt failed validation: {valid[1]} {valid[3]}")
        server = executor_adapter.RecordingServer()
        executor = executor_adapter.make_executor(execution, server)
        from comfy.cli_args import args

        previous_preview = args.preview_method
        try:
            executor.execute(prompt, prompt_id, executor_adapter.extra_data(preview_method), valid[2])
        finally:
            executor_adapter.reset_preview_method(previous_preview)
        if not executor.success:
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            raise AssertionError(f"prompt failed: {errors}")
        outputs = {}
        for node_id in prompt:
            cached = executor_adapter.cached_output(executor, node_id)
            if cached is not None:
                outputs[node_id] = cached
        return PromptResult(ui=executor.history_result["outputs"], outputs=outputs,
                            messages=executor.status_messages + server.messages)

    return run
