"""Installing the node pack: the registry metadata as ComfyUI's own parser reads it, the loader
command's errors, and the legacy mappings where ComfyUI has no V3 API."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
ACCEL = str(pathlib.Path(sys.executable).parent / "accel")


def test_pyproject_carries_the_registry_metadata_comfyui_reads(comfy):
    from comfy_config.config_parser import extract_node_configuration

    config = extract_node_configuration(str(ROOT))
    assert config.project.name == "accel-diffusers"
    assert config.tool_comfy.publisher_id == "accel" and config.tool_comfy.display_name.startswith("accel")
    assert config.project.supported_comfyui_version == ">=0.3.75"
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert "POSIX :: Linux" in config.project.supported_os


def test_install_writes_a_loader_and_refuses_a_folder_that_is_not_comfyui(tmp_path, comfyui_dir):
    bad = subprocess.run([ACCEL, "comfy", "install", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert f"{tmp_path} is not a ComfyUI folder (no main.py and comfy/ in it)" in bad.stderr
    good = subprocess.run([ACCEL, "comfy", "install", str(comfyui_dir)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    loader = comfyui_dir / "custom_nodes" / "accel_nodes" / "__init__.py"
    assert "from accel.comfyui import *" in loader.read_text()


def test_without_the_v3_api_the_same_nodes_come_as_legacy_mappings():
    """Outside ComfyUI (no ``comfy_api``), the package offers NODE_CLASS_MAPPINGS, as ComfyUI
    versions before the V3 API read them."""
    code = ("import accel.comfyui as pack; m = pack.NODE_CLASS_MAPPINGS; "
            "print(sorted(m), pack.NODE_DISPLAY_NAME_MAPPINGS['AccelPatchModel'], "
            "list(m['AccelCache'].INPUT_TYPES()['required'])[:2])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("['AccelAttention', 'AccelCache', 'AccelPatchModel'] accel: patch model "
                                  "['model', 'cache']")
