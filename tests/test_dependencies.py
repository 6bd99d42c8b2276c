"""Every declared core dependency is imported by the library, or is the plugin of one that is."""
import ast
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("accel", "attention", "caching", "solvers", "distill", "pipelines", "eval")
IMPORT_NAME = {"pillow": "PIL", "imageio-ffmpeg": "imageio_ffmpeg"}
# distribution -> (the imported library it serves, how): what no module of ours imports directly
PLUGINS = {
    "tokenizers": ("transformers", "fast tokenizers of the text encoders"),
    "accelerate": ("diffusers", "from_pretrained's low_cpu_mem_usage/device_map and enable_model_cpu_offload"),
    "pillow": ("imageio", "its GIF/PNG writer"),
    "imageio-ffmpeg": ("imageio", "its MP4 writer"),
}


def core_dependencies():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        declared = tomllib.load(fh)["project"]["dependencies"]
    return [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].strip().lower() for d in declared]


def imported_top_level():
    names = set()
    for folder in LIBRARY:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                        tree = ast.parse(fh.read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            names.update(a.name.split(".")[0] for a in node.names)
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            names.add(node.module.split(".")[0])
    return names


def test_every_core_dependency_is_imported_or_the_plugin_of_an_imported_one():
    imported = imported_top_level()
    unused = []
    for dist in core_dependencies():
        if IMPORT_NAME.get(dist, dist.replace("-", "_")) in imported:
            continue
        host = PLUGINS.get(dist)
        if host is None or host[0] not in imported:
            unused.append(dist)
    assert unused == [], f"declared but neither imported nor a plugin of an imported library: {unused}"


def test_the_check_sees_a_dependency_nobody_imports():
    assert "einops" not in imported_top_level()  # dropped from the core for exactly this reason
    assert {"torch", "diffusers", "imageio", "transformers"} <= imported_top_level()
