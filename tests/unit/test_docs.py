"""The docs stay true to the code.

- Every training command line in README.md and docs/*.md (``moetrain-train``,
  ``python -m moetrain.train``, ``torchrun ... -m moetrain.train``, ``srun``/``sbatch`` and
  the ``launch/`` scripts) composes with Hydra and passes ``validate`` at the world size the
  command implies. A command shown with its ``moetrain: invalid config:`` output must fail
  with that message. Composition starts no training and creates no process group.
- Every ``tools/*.py`` the docs name exists and answers ``--help`` with exit status 0.
- docs/config.md is what tools/gen_config_ref.py generates from moetrain/config/schema.py.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import load_tool

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Placeholders that a command line may show in place of a value, and what the check
# composes instead. Keep this small: a placeholder in a key, group or flag is not allowed.
PLACEHOLDERS = {"<name>": "tiny", "N": "10"}

SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
ERROR_PREFIX = "moetrain: invalid config: "


# ----------------------------------------------------------------------------- parsing
@dataclass
class Command:
    """One command line of a docs code block."""

    where: str  # "README.md:123"
    text: str  # the logical line, continuations joined
    expect_error: str | None = None  # the documented "moetrain: invalid config:" message


@dataclass
class Launch:
    """A training launch: the Hydra overrides and the world sizes it may run at."""

    overrides: list[str]
    world_sizes: list[int]
    multirun: bool = False
    env: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the line cannot be parsed


def code_blocks(text: str):
    """Yield (first line number, language, lines) of every fenced block. A fence may be
    indented (inside a list item); its indentation is removed from the block's lines."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            j += 1
        yield i + 2, lang, body
        i = j + 1


def block_commands(path_name: str, first_line: int, body: list[str]) -> list[Command]:
    """Logical command lines of one shell block. In a block with ``$ `` prompts only the
    prompted lines are commands, and the lines after one are its output."""
    prompted = any(line.startswith("$ ") for line in body)
    out: list[Command] = []
    i = 0
    while i < len(body):
        line, start = body[i], i
        if prompted and not line.startswith("$ "):
            i += 1
            continue
        if prompted:
            line = line[2:]
        while line.rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            line = line.rstrip()[:-1] + " " + body[i].strip()
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cmd = Command(f"{path_name}:{first_line + start}", line.strip())
        if prompted:
            output = []
            while i < len(body) and not body[i].startswith("$ "):
                output.append(body[i])
                i += 1
            errors = [o for o in output if o.startswith(ERROR_PREFIX)]
            cmd.expect_error = errors[0][len(ERROR_PREFIX):] if errors else None
        out.append(cmd)
    return out


def doc_commands(paths=DOC_FILES) -> list[Command]:
    cmds = []
    for path in paths:
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        for first, lang, body in code_blocks(path.read_text()):
            if lang in SHELL_LANGS:
                cmds += block_commands(name, first, body)
    return cmds


def _split_pipeline(tokens: list[str]) -> list[list[str]]:
    """Split at ``&&``, ``||``, ``;`` and ``|``: each part is a command of its own."""
    parts, cur = [], []
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            parts.append(cur)
            cur = []
        else:
            cur.append(t)
    return [p for p in parts + [cur] if p]


def _take_opt(tokens: list[str], i: int, names: tuple[str, ...]) -> tuple[str | None, int]:
    """Value of option ``tokens[i]`` if it is one of ``names`` (``--x=v`` or ``--x v``)."""
    t = tokens[i]
    for n in names:
        if t == n:
            return tokens[i + 1], i + 2
        if t.startswith(n + "="):
            return t[len(n) + 1:], i + 1
    return None, i


def _node_range(nnodes: str) -> list[int]:
    lo, _, hi = nnodes.partition(":")
    return sorted({int(lo), int(hi or lo)})


def _sbatch_default(option: str) -> str:
    """A ``#SBATCH --option=value`` default from the header of launch/slurm.sbatch."""
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    m = re.search(rf"^#SBATCH --{option}=(\S+)", text, re.MULTILINE)
    assert m, f"launch/slurm.sbatch has no #SBATCH --{option} line"
    return m.group(1)


def parse_launch(tokens: list[str]) -> Launch | None:
    """The training launch in one command's tokens, or None if it is not one."""
    env = {}
    while tokens and ENV_RE.match(tokens[0]):
        k, _, v = tokens[0].partition("=")
        env[k] = v
        tokens = tokens[1:]
    if not tokens:
        return None
    head, rest = tokens[0], tokens[1:]
    if head == "srun":  # srun's own options, then the command it runs on every node
        i = 0
        while i < len(rest) and rest[i].startswith("-"):
            i += 1
        return parse_launch(rest[i:]) if i < len(rest) else None
    if head == "moetrain-train":
        return _hydra_args(rest, [1], env)
    if head in ("python", "python3") and rest[:2] == ["-m", "moetrain.train"]:
        return _hydra_args(rest[2:], [1], env)
    if head in ("python", "python3") and rest[:2] == ["-m", "torch.distributed.run"]:
        head, rest = "torchrun", rest[2:]
    if head == "torchrun":
        nproc, nodes, i = 1, [1], 0
        while i < len(rest) and rest[i] != "-m":
            v, j = _take_opt(rest, i, ("--nproc_per_node", "--nproc-per-node"))
            if v is not None:
                nproc, i = int(v), j
                continue
            v, j = _take_opt(rest, i, ("--nnodes",))
            if v is not None:
                nodes, i = _node_range(v), j
                continue
            i += 1  # an option that does not change the world size
        if rest[i:i + 2] != ["-m", "moetrain.train"]:
            return None
        return _hydra_args(rest[i + 2:], [nproc * n for n in nodes], env)
    if head.endswith("launch/torchrun.sh"):
        nproc = int(env.get("NPROC", "1"))  # the script's default without a GPU
        return _hydra_args(rest, [nproc * int(env.get("NNODES", "1"))], env)
    if head.endswith("launch/elastic.sh"):
        nproc = int(env.get("NPROC", "1"))
        lo, hi = int(env.get("MIN_NODES", "1")), int(env.get("MAX_NODES", "1"))
        return _hydra_args(rest, [nproc * n for n in range(lo, hi + 1)], env)
    if head == "sbatch":
        nodes, gpus, i = None, None, 0
        while i < len(rest) and rest[i].startswith("-"):
            v, j = _take_opt(rest, i, ("--nodes", "-N"))
            if v is not None:
                nodes, i = v, j
                continue
            v, j = _take_opt(rest, i, ("--gpus-per-node",))
            if v is not None:
                gpus, i = v, j
                continue
            i += 1
        if i >= len(rest) or not rest[i].endswith("launch/slurm.sbatch"):
            return None
        nodes = nodes or _sbatch_default("nodes")
        gpus = env.get("GPUS_PER_NODE") or (gpus or _sbatch_default("gpus-per-node"))
        per_node = int(gpus.rpartition(":")[2])
        return _hydra_args(rest[i + 1:], [per_node * n for n in _node_range(nodes)], env)
    return None


def _hydra_args(args: list[str], world_sizes: list[int], env: dict) -> Launch:
    multirun = False
    overrides = []
    for a in args:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a.startswith("-"):
            raise ValueError(f"unsupported flag {a!r} on a training command line")
        else:
            overrides.append(a)
    return Launch(overrides, world_sizes, multirun, env)


def _substitute(override: str) -> str:
    key, eq, value = override.partition("=")
    return f"{key}={PLACEHOLDERS.get(value, value)}" if eq else override


def _sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweep: ``k=a,b`` runs once per value (commas outside brackets)."""
    choices = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and "," in value and not re.search(r"[\[\]{}()]", value):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([o])
    return [list(c) for c in itertools.product(*choices)]


def _error_text(e: BaseException) -> str:
    cause = f" ({e.__cause__})" if e.__cause__ and str(e.__cause__) not in str(e) else ""
    return f"{e}{cause}".replace("\n", " ")


@functools.cache
def _compose(overrides: tuple[str, ...]):
    """The typed config ``moetrain-train`` would compose, or the error text. Cached: the
    same command line appears on several pages."""
    from moetrain.config import compose_config

    try:
        return compose_config(list(overrides))
    except Exception as e:  # noqa: BLE001 (a ConfigError, or Hydra refusing an override)
        return _error_text(e)


def check_launch(launch: Launch) -> str | None:
    """Compose and validate every run of ``launch`` at each of its world sizes. Returns the
    first error's message, or None when every run is valid."""
    from moetrain.config import validate

    if launch.error:
        return launch.error
    runs = _sweep(launch.overrides) if launch.multirun else [launch.overrides]
    for overrides in runs:
        cfg = _compose(tuple(_substitute(o) for o in overrides))
        if isinstance(cfg, str):
            return cfg
        for world in launch.world_sizes:
            try:  # validate resolves train.micro_batch_size=auto in place: use a copy
                validate(copy.deepcopy(cfg), world)
            except Exception as e:  # noqa: BLE001 (every ConfigError subclass, and more)
                return _error_text(e)
    return None


LAUNCH_MARKERS = ("moetrain-train", "moetrain.train", "launch/")


def training_launches(commands: list[Command]) -> list[tuple[Command, Launch]]:
    found = []
    for cmd in commands:
        try:
            parts = _split_pipeline(shlex.split(cmd.text, comments=True))
        except ValueError as e:  # unbalanced quotes: an error if it is a launch
            if any(m in cmd.text for m in LAUNCH_MARKERS):
                found.append((cmd, Launch([], [1], error=f"not a shell command line: {e}")))
            continue
        for tokens in parts:
            try:
                launch = parse_launch(tokens)
            except (ValueError, IndexError) as e:  # e.g. --nproc_per_node=$N
                launch = Launch([], [1], error=f"cannot read the launch: {e!r}")
            if launch is not None:
                found.append((cmd, launch))
    return found


LAUNCHES = training_launches(doc_commands())


# ----------------------------------------------------------------------------- tests
def test_parser_reads_world_sizes_env_continuations_and_errors(tmp_path):
    """The command parser itself, on one hand-written page: the world size each launcher
    implies, env prefixes, ``\\`` continuations, chained commands and expected errors."""
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "pip install x && moetrain-train train.steps=5   # a comment\n"
        "torchrun --nproc_per_node=4 --nnodes 2 -m moetrain.train \\\n"
        "    parallel.ep=2\n"
        "NPROC=4 NNODES=2 launch/torchrun.sh parallel.tp=2\n"
        "MIN_NODES=1 MAX_NODES=3 NPROC=2 launch/elastic.sh seed=1\n"
        "sbatch --nodes=4 launch/slurm.sbatch model=small\n"
        "srun --ntasks-per-node=1 torchrun --nnodes=1:2 --nproc-per-node 8 -m moetrain.train\n"
        "python tools/prepare_data.py --input a --output b\n"
        "```\n"
        "  ```\n"
        "  $ moetrain-train -m optim.lr=1e-3,3e-3 'x=${y}'\n"
        "  moetrain: invalid config: broken\n"
        "  ```\n")
    found = training_launches(doc_commands([page]))
    got = [(c.where.split(":")[1], lz.overrides, lz.world_sizes, c.expect_error)
           for c, lz in found]
    sbatch_gpus = int(_sbatch_default("gpus-per-node").rpartition(":")[2])
    assert got == [
        ("2", ["train.steps=5"], [1], None),
        ("3", ["parallel.ep=2"], [8], None),
        ("5", ["parallel.tp=2"], [8], None),
        ("6", ["seed=1"], [2, 4, 6], None),
        ("7", ["model=small"], [4 * sbatch_gpus], None),
        ("8", [], [8, 16], None),
        ("12", ["optim.lr=1e-3,3e-3", "x=${y}"], [1], "broken"),
    ]
    assert found[-1][1].multirun
    assert _sweep(["optim.lr=1e-3,3e-3", "parallel.pp_split=[0,3]"]) == [
        ["optim.lr=1e-3", "parallel.pp_split=[0,3]"], ["optim.lr=3e-3", "parallel.pp_split=[0,3]"]]


def test_check_catches_a_stale_command():
    """A misspelt key, a value the schema rejects and a layout the world size cannot hold
    are each reported; the same overrides without the fault pass."""
    assert "trian" in check_launch(Launch(["trian.steps=5"], [1]))
    assert "model.top_k=20" in check_launch(Launch(["model.top_k=20"], [1]))
    assert "parallel.ep=2" in check_launch(Launch(["parallel.ep=2"], [1]))
    assert check_launch(Launch(["parallel.ep=2"], [2])) is None


def test_docs_have_training_commands():
    """The scan found the README's and the parallelism page's launches (a broken scan would
    otherwise pass every check below by finding nothing)."""
    files = {c.where.split(":")[0] for c, _ in LAUNCHES}
    assert {"README.md", "docs/parallelism.md"} <= files, files
    assert any(max(lz.world_sizes) > 1 for _, lz in LAUNCHES)


@pytest.mark.parametrize("cmd,launch", LAUNCHES, ids=[c.where for c, _ in LAUNCHES])
def test_doc_command_composes_and_validates(cmd, launch):
    import torch.distributed as dist

    err = check_launch(launch)
    assert not dist.is_initialized(), "checking a command line created a process group"
    if cmd.expect_error is None:
        assert err is None, (f"{cmd.where}: `{cmd.text}` fails at world size "
                             f"{launch.world_sizes}: {err}")
    else:  # documented output; "..." ends a shortened message
        want = cmd.expect_error.rstrip()
        assert err is not None, f"{cmd.where}: `{cmd.text}` is shown failing but is valid"
        if want.endswith("..."):
            assert err.startswith(want[:-3].rstrip()), f"{cmd.where}: documented {want!r}, got {err!r}"
        else:
            assert err == want, f"{cmd.where}: documented {want!r}, got {err!r}"


# Runs each tool as ``python tools/X.py --help`` would, in one interpreter so that torch
# is imported once: the tool's folder first on sys.path, __name__ == "__main__".
_HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
results = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path.insert(0, os.path.dirname(path))
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code, out = 1, io.StringIO(f"{type(e).__name__}: {e}")
    finally:
        sys.path.pop(0)
    results[path] = [code, out.getvalue()[:2000]]
print("\n" + json.dumps(results))
"""


def named_tools() -> dict[str, str]:
    """tools/*.py named anywhere in the docs: tool path -> first place it is named."""
    tools = {}
    for path in DOC_FILES:
        name = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"\btools/([A-Za-z0-9_]+\.py)\b", line):
                tools.setdefault(f"tools/{m.group(1)}", f"{name}:{n}")
    return tools


def test_named_tools_exist_and_answer_help():
    tools = named_tools()
    assert "tools/gen_config_ref.py" in tools and "tools/prepare_data.py" in tools
    missing = {t: w for t, w in tools.items() if not (ROOT / t).is_file()}
    assert not missing, f"the docs name tools that do not exist: {missing}"
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_RUNNER, *(str(ROOT / t) for t in sorted(tools))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {Path(p).relative_to(ROOT).as_posix(): r for p, r in results.items()
           if r[0] != 0 or "usage" not in r[1].lower()}
    assert not bad, f"tools whose --help fails or prints no usage: {bad}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats. Headings inside code blocks do not count."""
    anchors, seen, fence = set(), {}, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6} (.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_heading_anchors_follow_github():
    text = "# A `b.c` d\n## Layout: pp × dp\n```\n# not a heading\n```\n## x\n## x\n"
    assert heading_anchors(text) == {"a-bc-d", "layout-pp--dp", "x", "x-1"}


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names an existing file, and its
    ``#anchor`` a heading of that page."""
    bad = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in re.finditer(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(
                    dest.read_text()):
                bad.append(f"{path.name}: {target} (no such heading)")
    assert not bad, bad


def test_ci_runs_the_readme_set_up_commands():
    """.ci/run installs and tests exactly as README's "Set up" says: its pip install (less
    the ``python -m`` prefix) and its pytest command are commands of that section."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Set up\n(.*?)^## ", readme, re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## Set up' section"
    setup_cmds = [c.text for c in doc_commands([ROOT / "README.md"])
                  if c.text in m.group(1)]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    install = next(line for line in ci if "pip install" in line).split(" || ")[0]
    install = install.removeprefix("python -m ")
    test = next(line for line in ci if "pytest" in line)
    assert any(install in c.split(" && ") for c in setup_cmds), (install, setup_cmds)
    assert test in setup_cmds, (test, setup_cmds)


def test_config_reference_is_current():
    gen = load_tool("gen_config_ref")
    stale = gen.check(ROOT / "docs" / "config.md")
    assert stale is None, stale
