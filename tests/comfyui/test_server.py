"""The real ComfyUI server with the nodes installed by ``accel comfy install``: the node ids in
``/object_info``, a posted API graph through ``AccelPatchModel`` run to success, and the shipped
example workflow valid against the server's own node definitions."""
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import safetensors.torch
import torch

from accel.comfyui.tiny import save_tiny_wan

WORKFLOW = pathlib.Path(__file__).resolve().parents[2] / "accel" / "comfyui" / "workflows" / "wan21_t2v_accel.json"
MODEL_NAME = "accel_tiny_wan.safetensors"
# A test-only node: random text conditioning for the tiny Wan (no text encoder offline)
CONDITIONING_NODE = '''import torch
from accel.comfyui.tiny import conditioning


class AccelTestConditioning:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def make(self, seed):
        return (conditioning(seed),)


NODE_CLASS_MAPPINGS = {"AccelTestConditioning": AccelTestConditioning}
'''


def graph(preset: str) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_NAME, "weight_dtype": "default"}},
        "2": {"class_type": "AccelPatchModel", "inputs": {
            "model": ["1", 0], "preset": preset, "cache": "preset", "threshold": -1.0, "interval": 0,
            "forecast": "default", "attention": "preset", "density": -1.0, "dense_warmup": -1.0,
            "start_percent": 0.0, "end_percent": 1.0}},
        "3": {"class_type": "AccelTestConditioning", "inputs": {"seed": 1}},
        "4": {"class_type": "AccelTestConditioning", "inputs": {"seed": 2}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                   "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 0,
            "steps": 8, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "accel_test"}},
    }


def _request(url: str, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(comfy, comfyui_dir, stand_ins, tmp_path_factory):
    """``accel comfy install`` into the cached ComfyUI, the tiny Wan in its models, then main.py --cpu."""
    installed = subprocess.run([str(pathlib.Path(sys.executable).parent / "accel"), "comfy", "install",
                                str(comfyui_dir)], capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    (comfyui_dir / "custom_nodes" / "accel_test_conditioning.py").write_text(CONDITIONING_NODE)
    save_tiny_wan(str(comfyui_dir / "models" / "diffusion_models" / MODEL_NAME))
    work = tmp_path_factory.mktemp("comfyui-run")
    missing = [name for name in ("torchvision", "comfyui_frontend_package") if importlib.util.find_spec(name) is None]
    path = work / "stand-ins"
    for name in missing:  # only the packages this Python lacks
        (path / name).mkdir(parents=True)
        for item in (stand_ins / name).rglob("*"):
            target = path / name / item.relative_to(stand_ins / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if item.is_file():
                target.write_bytes(item.read_bytes())
    port = _free_port()
    log = open(work / "server.log", "w")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
         "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
         "--user-directory", str(work / "user"), "--database-url", f"sqlite:///{work / 'comfyui.db'}"],
        cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
    (work / "user").mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    info = None
    while time.time() < deadline and process.poll() is None:
        try:
            info = _request(f"{url}/object_info")
            break
        except OSError:
            time.sleep(1)
    try:
        assert info is not None, (work / "server.log").read_text()[-4000:]
        yield url, info, work
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_the_installed_nodes_are_in_object_info(server):
    _, info, _ = server
    for node, display in (("AccelPatchModel", "accel: patch model"), ("AccelCache", "accel: cache"),
                          ("AccelAttention", "accel: attention")):
        assert info[node]["display_name"] == display and info[node]["output"] == ["MODEL"], node
    presets = info["AccelPatchModel"]["input"]["required"]["preset"]
    assert "quality" in json.dumps(presets) and "off" in json.dumps(presets)


def test_a_posted_graph_through_accel_patch_model_runs_to_success(server):
    url, _, work = server
    prompt_id = _request(f"{url}/prompt", {"prompt": graph("fast"), "client_id": "accel-test"})["prompt_id"]
    deadline, entry = time.time() + 300, None
    while time.time() < deadline:
        entry = _request(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] != "running":
            break
        time.sleep(1)
    log = (work / "server.log").read_text()
    assert entry is not None and entry["status"]["status_str"] == "success", (entry, log[-4000:])
    (saved,) = entry["outputs"]["7"]["latents"]
    latent = safetensors.torch.load_file(str(work / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    assert latent.shape == (1, 16, 3, 8, 8) and torch.isfinite(latent).all()
    assert "accel (fast) on wan, 8 steps" in log and "skipped the cached blocks in cond_uncond" in log, log[-4000:]


def test_a_bad_value_is_an_error_on_the_node_not_a_crash(server):
    url, _, _ = server
    bad = graph("fast")
    bad["2"]["inputs"]["start_percent"], bad["2"]["inputs"]["end_percent"] = 0.9, 0.1
    prompt_id = _request(f"{url}/prompt", {"prompt": bad, "client_id": "accel-test"})["prompt_id"]
    deadline, entry = time.time() + 120, None
    while time.time() < deadline:
        entry = _request(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"]["status_str"] in ("error", "success"):
            break
        time.sleep(1)
    assert entry is not None and entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "AccelPatchModel"
    assert "start_percent and end_percent must satisfy" in errors[0]["exception_message"]
    assert _request(f"{url}/system_stats")["system"]  # the server is still up


def test_the_shipped_example_workflow_matches_the_servers_nodes(server):
    _, info, _ = server
    workflow = json.loads(WORKFLOW.read_text())
    classes = [node["class_type"] for node in workflow.values()]
    assert {"UNETLoader", "AccelPatchModel", "KSampler", "VAEDecode"} <= set(classes)
    for key, node in workflow.items():
        definition = info[node["class_type"]]
        required = definition["input"]["required"]
        assert set(required) <= set(node["inputs"]), (key, sorted(set(required) - set(node["inputs"])))
        declared = {**required, **definition["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            assert name in declared, (key, name)
            spec = declared[name]
            options = spec[0] if isinstance(spec[0], list) else spec[1].get("options") if spec[0] == "COMBO" else None
            if options and not isinstance(value, list) and not name.endswith("_name"):  # file names vary
                assert value in options, (key, name, value)
