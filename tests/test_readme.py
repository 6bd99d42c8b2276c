"""The README is runnable and reads as documentation: every Python block runs (tiny pipelines stand in
for hub models), every shell command parses or runs, CI runs the README's test command, and no
page of the docs speaks of how the project was developed."""
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import diffusers
import pytest

from accel.cli import command_parser
from accel.pipelines.tiny import TINY_SPECS, build_tiny_pipeline, tiny_call_kwargs

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def quickstart_commands():
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    # The last block of the section is the quickstart proper; earlier blocks are installation.
    return [line.strip() for line in blocks(section, "bash")[-1].splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    test_command = commands[1]
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"


# ---------------------------------------------------------------------------------------- Python


def stand_in(pipeline_class):
    """``from_pretrained`` of a hub pipeline, offline: the tiny pipeline of its family, run at the
    tiny size whatever size the block asks for, and left on the CPU by ``.to("cuda")``."""
    family = next(name for name, spec in TINY_SPECS.items() if spec.pipeline_class == pipeline_class.__name__)

    def from_pretrained(*args, **kwargs):
        pipe = build_tiny_pipeline(family)
        tiny = tiny_call_kwargs(family, steps=2)
        size = {k: tiny[k] for k in ("height", "width", "num_frames", "num_inference_steps", "max_sequence_length")
                if k in tiny}
        base = type(pipe)

        class StandIn(base):
            def __call__(self, *args, **kwargs):
                return base.__call__(self, *args, **{**kwargs, **size})

            def to(self, *args, **kwargs):
                return self

        StandIn.__name__ = StandIn.__qualname__ = base.__name__
        pipe.__class__ = StandIn
        return pipe

    return classmethod(lambda cls, *args, **kwargs: from_pretrained(*args, **kwargs))


PYTHON_BLOCKS = blocks(README, "python")


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_every_python_block_of_the_readme_runs(index, monkeypatch):
    source = PYTHON_BLOCKS[index]
    for name in re.findall(r"(\w+Pipeline)\.from_pretrained", source):
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained", stand_in(getattr(diffusers, name)))
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(source, f"README.md python block {index}", "exec"), namespace)
    handles = [v for v in namespace.values() if type(v).__name__ == "Handle"]
    assert all(h.removed for h in handles), "every block that patches also shows the undo"


def test_python_blocks_cover_the_promised_uses():
    text = "\n".join(PYTHON_BLOCKS)
    for use in ("accel.patch(", "accel.patched(", "handle.remove()", "handle.summary()", 'solver="dss"',
                'cache="teacache"', "reference_call_kwargs("):
        assert use in text, use


# ----------------------------------------------------------------------------------------- shell


def shell_commands(text):
    """Every command line of every bash block, continuation lines joined."""
    commands = []
    for block in blocks(text, "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands += [re.split(r"\s(?:\||2>&1|>)", part)[0].strip() for part in line.split("&&")]
    return commands


def parse_only(command):
    """Parse an ``accel`` or ``python -m accel...`` command line with its own parser, not running it."""
    argv = shlex.split(command.replace("{steps}", "4").replace("<device>", "h200"))
    if argv[0] == "accel":
        parser, args = command_parser(argv[1:])
    elif "accel.cli" in argv:  # the accel command under a launcher (accelerate launch ... -m accel.cli ...)
        parser, args = command_parser(argv[argv.index("accel.cli") + 1:])
    else:
        module = __import__(argv[argv.index("-m") + 1], fromlist=["build_parser"])
        parser, args = module.build_parser(), argv[argv.index("-m") + 2:]
    parser.parse_args(args)


@pytest.mark.parametrize("page", sorted(DOCS))
def test_every_documented_command_parses(page):
    """Every ``accel`` and ``python -m accel...`` line of the README and docs has flags that exist and
    values that pass their checks; ``pip`` lines name extras that exist."""
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    checked = 0
    for command in shell_commands(DOCS[page]):
        if command.startswith("accel ") or " -m accel." in command:
            parse_only(command)
            checked += 1
        elif command.startswith(("pip ", "python3 -m pip")):
            assert set(re.findall(r"\.\[(\w+)\]", command)) <= extras, command
    assert checked or page not in ("README.md", "results.md", "gpu_runbook.md")


def test_the_readme_quickstart_demo_runs_as_written(tmp_path):
    """The README's `accel demo --out demo`, exactly, offline, in a fresh folder (the test command is
    what CI runs; the install lines need the network)."""
    demo = quickstart_commands()[0]
    assert demo == "accel demo --out demo"
    result = subprocess.run([sys.executable, "-m", "accel.cli", *shlex.split(demo)[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "side_by_side.gif").is_file()


# ----------------------------------------------------------------------------------- plain words

HISTORY = [r"\bissues?\b", r"\brun[- ]?8\b", r"\blent\b", r"\bsessions\b", r"\bthis session\b", r"\bdevice tool\b",
           r"\bprovisional (weights|model)\b", r"\bno GPU was\b"]


@pytest.mark.parametrize("page", sorted(DOCS))
def test_the_docs_contain_no_development_history(page):
    found = [f"{pattern}: ...{DOCS[page][max(0, m.start() - 40):m.end() + 40]!r}..."
             for pattern in HISTORY for m in re.finditer(pattern, DOCS[page], flags=re.I)]
    assert not found, "\n".join(found)
