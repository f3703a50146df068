"""Every documented example runs: the ```python blocks of README.md and docs/*.md (shrunk to test
size by the tables below), the `rk.` names the docs mention, and the flags of every documented
`python -m` command.

A new block or command is checked by default. The tables say how a block is adapted; each entry
must still match the docs (test_tables_match_the_docs), so a stale one fails rather than lingers.
"""

import concurrent.futures
import dataclasses
import functools
import glob
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import repvgg_keras as rk
from repvgg_keras import checkpoints
from tests.helpers import REPO

DOCS = ("README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md")))

# ---------------------------------------------------------------- how the examples are adapted

# (documented text, what the test runs instead), applied to every ```python block: the documented
# 512 px inputs run at 64 px; the reader's own training is left out.
SUBSTITUTIONS = (
    ("input_shape=(512, 512, 3)", "input_shape=(64, 64, 3)"),
    ("input_shape=(512, 1024, 3)", "input_shape=(64, 128, 3)"),
    ("model.compile(...); model.fit(...)", "pass"),
)


def _images(*shape):
    return np.random.default_rng(0).normal(size=shape).astype("float32")


def _fast_predictor_inputs():
    """A small model and images it classifies with a clear margin, as a trained model does its
    own data (so int8, tried first, keeps top-1 and the slower candidates are not needed)."""
    keras.utils.set_random_seed(0)
    spec = rk.RepVGGSpec("doc_tiny", num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25))
    model = rk.RepVGG(spec, input_shape=(32, 32, 3), classes=10)
    pool = _images(512, 32, 32, 3)
    logits = np.sort(np.asarray(model(pool)), axis=-1)
    x = pool[np.argsort(logits[:, -2] - logits[:, -1])[:64]]
    return {"model": model, "x": x, "c": x[:16]}


# Names a block takes from the reader's own code, defined just before the block that holds the
# line: {distinctive line: () -> {name: value}}.
GIVENS = {
    "kernel, bias = block.get_deploy_weights()": lambda: {"filters": 8, "x": _images(2, 16, 16, 8)},
    "logits = plain(images)": lambda: {"images": _images(2, 64, 128, 3)},
    "predict = fast_predictor(": _fast_predictor_inputs,
}

# What a block's comments promise, evaluated after the block that holds the line.
CHECKS = {
    "stem, s1, s2, s3, s4 = features.outputs": (
        "[64 // o.shape[1] for o in features.outputs] == [2, 4, 8, 8, 8]"
    ),
    "logits = plain(images)": "tuple(logits.shape) == (2, 64, 128, 19) and logits.dtype == 'float32'",
    "kernel, bias = block.get_deploy_weights()": (
        "kernel.shape == (3, 3, 8, 8) and kernel.dtype == bias.dtype == 'float32'"
    ),
}

# Blocks not run, keyed by a distinctive line, each with the reason (a GPU, a server, ...).
# Empty: every documented block runs on a CPU.
SKIPPED = {}

# Files the examples load, made from random models of the same variant and form:
# {file name: (variant, form, format)}. "authors" is the authors' wrapped .pth, "timm" timm's
# .safetensors naming, "keras" a .weights.h5.
LOCAL_FILES = {
    "RepVGG-A0-train.pth": ("RepVGG_A0", "train", "authors"),
    "a0-deploy.pth": ("RepVGG_A0", "deploy", "authors"),
    "model.safetensors": ("RepVGG_B1g4", "train", "timm"),
    "a0.safetensors": ("RepVGG_A0", "train", "timm"),
    "a0.weights.h5": ("RepVGG_A0", "train", "keras"),
}
# weights="imagenet" / backbone_weights="imagenet" download from a local mirror holding these.
IMAGENET_VARIANTS = ("RepVGG_A0", "RepVGG_B1g4")

# ---------------------------------------------------------------- reading the docs

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


@dataclasses.dataclass
class Block:
    doc: str
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str


def fenced_blocks(doc, text=None):
    """The fenced blocks of `doc` (or of `text`, read as that doc), in order."""
    if text is None:
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            text = f.read()
    blocks, open_fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if open_fence is None:
            if match:
                open_fence = (match.group(1), match.group(2), number + 1, [])
        elif match and match.group(1) == open_fence[0] and not match.group(2):
            indent, lang, first, lines = open_fence
            blocks.append(Block(doc, first, lang, "\n".join(lines) + "\n"))
            open_fence = None
        else:
            indent = open_fence[0]
            open_fence[3].append(line[len(indent) :] if line.startswith(indent) else line)
    assert open_fence is None, f"{doc}: unclosed ``` fence at line {open_fence[2] - 1}"
    return blocks


def python_blocks(doc, text=None):
    return [b for b in fenced_blocks(doc, text) if b.lang == "python"]


@functools.cache
def all_python_blocks():
    return [b for doc in DOCS for b in python_blocks(doc)]


PYTHON_DOCS = [doc for doc in DOCS if python_blocks(doc)]

# ---------------------------------------------------------------- running the examples


def _matching(table, code):
    return [key for key in table if key in code]


def run_examples(doc, text=None):
    """Run `doc`'s python blocks in order in one namespace; returns (run, skipped) counts."""
    namespace = {"__name__": "__doc_example__"}
    run = skipped = 0
    for block in python_blocks(doc, text):
        if _matching(SKIPPED, block.code):
            skipped += 1
            continue
        code = block.code
        for old, new in SUBSTITUTIONS:
            code = code.replace(old, new)
        for key in _matching(GIVENS, block.code):
            namespace.update(GIVENS[key]())
        # Padded so that a traceback names the doc's own line.
        exec(compile("\n" * (block.line - 1) + code, os.path.join(REPO, doc), "exec"), namespace)
        for key in _matching(CHECKS, block.code):
            assert eval(CHECKS[key], namespace), f"{doc}:{block.line}: {CHECKS[key]} is false"
        run += 1
    return run, skipped


_AUTHORS_TO_TIMM = (
    (r"^stage0\.", "stem."),
    (r"^stage(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.rbr_dense\.", ".conv_kxk."),
    (r"\.rbr_1x1\.", ".conv_1x1."),
    (r"\.rbr_identity\.", ".identity."),
    (r"\.se\.down\.", ".attn.fc1."),
    (r"\.se\.up\.", ".attn.fc2."),
    (r"\.rbr_reparam\.", ".reparam_conv."),
    (r"^linear\.", "head.fc."),
)


def _state_dict(model, naming):
    """The checkpoint `model` would load from: PyTorch layouts, the authors' or timm's names."""
    state = {}
    for key, (variable, _) in checkpoints.expected_tensors(model).items():
        value = np.asarray(variable)
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T  # HWIO -> OIHW
        if naming == "timm":
            for pattern, replacement in _AUTHORS_TO_TIMM:
                key = re.sub(pattern, replacement, key)
        state[key] = np.ascontiguousarray(value)
    return state


def _write(path, variant, form, fmt):
    model = rk.get_model(variant, deploy=form == "deploy")
    if fmt == "keras":
        model.save_weights(path)
    elif fmt == "timm":
        from safetensors.numpy import save_file

        save_file(_state_dict(model, "timm"), path)
    else:  # the authors' trainer wraps and prefixes its state dict
        import torch

        state = _state_dict(model, "authors")
        torch.save(
            {"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()}}, path
        )


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    """A working directory holding LOCAL_FILES, and an ImageNet mirror beside it."""
    pytest.importorskip("torch", reason="the examples read the authors' .pth files")
    root = tmp_path_factory.mktemp("docs")
    work, mirror = root / "work", root / "mirror"
    work.mkdir()
    mirror.mkdir()
    for name, (variant, form, fmt) in LOCAL_FILES.items():
        _write(str(work / name), variant, form, fmt)
    for variant in IMAGENET_VARIANTS:
        timm_name = variant.replace("RepVGG_", "repvgg_").lower() + ".rvgg_in1k"
        made = [n for n, spec in LOCAL_FILES.items() if spec == (variant, "train", "timm")]
        target = str(mirror / f"{timm_name}.safetensors")
        if made:
            os.link(work / made[0], target)
        else:
            _write(target, variant, "train", "timm")
    keras.backend.clear_session()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("doc", PYTHON_DOCS)
def test_python_examples_run(doc, example_dir, monkeypatch):
    monkeypatch.chdir(example_dir / "work")
    monkeypatch.syspath_prepend(REPO)  # `from export.fast_predictor import ...`
    url = f"file://{example_dir / 'mirror'}/{{timm_name}}.safetensors"
    monkeypatch.setenv(checkpoints.BASE_URL_ENV, url)  # nothing reaches the network
    monkeypatch.setenv(checkpoints.CACHE_DIR_ENV, str(example_dir / "cache"))
    keras.backend.clear_session()
    run, _ = run_examples(doc)
    assert run


def test_tables_match_the_docs():
    """Every substitution, given, check, skip and local file still names text in a block."""
    blocks = all_python_blocks()
    codes = [b.code for b in blocks]
    stale = [old for old, _ in SUBSTITUTIONS if not any(old in c for c in codes)]
    for name, table in (("GIVENS", GIVENS), ("CHECKS", CHECKS), ("SKIPPED", SKIPPED)):
        stale += [f"{name}[{key!r}]" for key in table if not any(key in c for c in codes)]
    stale += [f"LOCAL_FILES[{n!r}]" for n in LOCAL_FILES if not any(f'"{n}"' in c for c in codes)]
    stale += [
        f"IMAGENET_VARIANTS {v!r}"
        for v in IMAGENET_VARIANTS
        if not any(v in c and '"imagenet"' in c for c in codes)
    ]
    assert not stale, f"no longer in any ```python block of {DOCS}: {stale}"
    assert len(blocks) >= 8  # the parser still finds the examples


def test_the_runner_fails_on_a_broken_example():
    broken = "```python\nimport repvgg_keras as rk\n\nmodel = rk.RepVGG_A9()\n```\n"
    with pytest.raises(AttributeError, match="RepVGG_A9") as error:
        run_examples("README.md", broken)
    assert error.traceback[-1].lineno == 3  # 0-based: the doc's line 4
    assert run_examples("README.md", broken.replace("A9", "A0")) == (1, 0)


# ---------------------------------------------------------------- `rk.` names in the prose

RK_NAME = re.compile(r"\brk\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# In a fresh interpreter: here, other tests' imports would bind submodules such as rk.preprocessing.
RESOLVE = """
import sys
import repvgg_keras as rk
for line in sys.stdin.read().split():
    value = rk
    for part in line.split("@")[1].split("."):
        if not hasattr(value, part):
            print(line.replace("@", ": rk."))
            break
        value = getattr(value, part)
"""


def test_rk_names_in_the_docs_exist():
    names = []
    for doc in DOCS:
        with open(os.path.join(REPO, doc), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                names += [f"{doc}:{number}@{m.group(1)}" for m in RK_NAME.finditer(line)]
    assert len(names) > 20
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE],
        input="\n".join(names),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout, "after `import repvgg_keras as rk` these do not exist:\n" + done.stdout


# ---------------------------------------------------------------- documented commands

COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*python3?\s+-m\s+([\w.]+)(.*)$")
OTHER_TOOLS = ("pip",)  # `python -m pip ...`: not this repository's modules


@dataclasses.dataclass
class Command:
    doc: str
    line: int
    module: str
    args: str


def documented_commands(doc, text=None):
    """`python -m module ...` lines of the non-python fences (continuations joined)."""
    commands = []
    for block in fenced_blocks(doc, text):
        if block.lang == "python":
            continue
        lines = block.code.splitlines()
        i = 0
        while i < len(lines):
            first, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            match = COMMAND.match(line.strip())
            if match and match.group(1) not in OTHER_TOOLS:
                args = re.sub(r"\s#.*$", "", match.group(2))  # a trailing comment
                commands.append(Command(doc, block.line + first, match.group(1), args))
    return commands


COMMANDS = [c for doc in DOCS for c in documented_commands(doc)]


@dataclasses.dataclass
class Flags:
    names: set
    booleans: set
    enums: dict  # name -> allowed values
    help_text: str = ""  # for a module that is not an absl app: its --help output


ABSL_FLAG = re.compile(r"^  (?:-\S+,)?--(\[no\])?([\w-]+):(?: <([\w|.-]+)>:)?", re.M)


def module_flags(module):
    """The flags `python -m module` defines, from one --helpfull (absl) or --help run."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def help_output(flag):
        done = subprocess.run(
            [sys.executable, "-m", module, flag],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        return done.stdout + done.stderr

    out = help_output("--helpfull")
    if "--[no]helpfull" not in out:  # not an absl app: its --help must name each flag
        out = help_output("--help")
        assert "No module named" not in out, out[-2000:]
        return Flags(set(), set(), {}, help_text=out)
    flags = Flags(set(), set(), {})
    for negatable, name, choices in ABSL_FLAG.findall(out):
        flags.names.add(name)
        if negatable:
            flags.booleans.add(name)
        if choices:
            flags.enums[name] = set(choices.split("|"))
    return flags


def flag_problems(flags, args):
    """What in `args` (a documented command line) `flags` does not define."""
    tokens = args.replace("[", " ").replace("]", " ").split()
    problems = []
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue
        name, has_value, value = token[2:].partition("=")
        if flags.help_text:
            if f"--{name}" not in flags.help_text:
                problems.append(f"--{name} is not in its --help")
            continue
        if name not in flags.names:
            if name.startswith("no") and name[2:] in flags.booleans:
                continue
            problems.append(f"--{name} is not defined")
            continue
        if name in flags.booleans and has_value and value.lower() not in ("true", "false"):
            problems.append(f"--{name}={value}: a boolean")
        if name in flags.enums:
            if not has_value and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value = tokens[i + 1]
            bad = [v for v in value.split("|") if v and v not in flags.enums[name]]
            if bad:
                problems.append(f"--{name} {value}: {bad} not in {sorted(flags.enums[name])}")
    return problems


@functools.cache
def _help_runs():
    """{module: future of its Flags}: one --helpfull per module, two at a time, in the background."""
    pool = concurrent.futures.ThreadPoolExecutor(2)
    return {m: pool.submit(module_flags, m) for m in sorted({c.module for c in COMMANDS})}


@pytest.fixture(scope="module", autouse=True)
def _start_help_runs(request):
    """Start the --helpfull subprocesses first, so that they run beside the examples."""
    if any("flags_by_module" in getattr(i, "fixturenames", ()) for i in request.session.items):
        _help_runs()


@pytest.fixture(scope="module")
def flags_by_module():
    return {module: future.result() for module, future in _help_runs().items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", COMMANDS, ids=[f"{c.doc}:{c.line}:{c.module}" for c in COMMANDS]
)
def test_documented_command_flags_exist(command, flags_by_module):
    problems = flag_problems(flags_by_module[command.module], command.args)
    assert not problems, f"{command.doc}:{command.line}: python -m {command.module}: {problems}"


def test_command_checker_catches_a_wrong_flag():
    flags = Flags({"model", "quantize", "nchw"}, {"nchw"}, {"quantize": {"none", "int8"}})
    assert not flag_problems(flags, "--model A0 --nonchw [--quantize int8] --nchw=false")
    assert flag_problems(flags, "--modle A0") == ["--modle is not defined"]
    assert flag_problems(flags, "--nomodel") == ["--nomodel is not defined"]
    assert flag_problems(flags, "[--quantize none|int4]")[0].startswith("--quantize none|int4")
    text = "```\nX=1 python3 -m pkg.mod --a 1 \\\n  --b  # a comment --c\n```\n"
    (command,) = documented_commands("README.md", text)
    assert (command.module, command.line, command.args.split()) == (
        "pkg.mod",
        2,
        ["--a", "1", "--b"],
    )
    assert len(COMMANDS) >= 30  # the parser still finds the documented commands
