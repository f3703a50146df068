"""The library stands alone: `repvgg_keras` imports nothing from `export`, `train` or `bench`,
and its own modules import each other one way (no circles, so no imports hidden in functions)."""

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

BLOCKED_IMPORT = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("export", "train", "bench"):
            raise ImportError(f"repvgg_keras imported {name}")

sys.meta_path.insert(0, Block())
import numpy as np
import repvgg_keras as rk
from repvgg_keras import checkpoints, convert_checkpoint, parity, preprocessing, structure  # noqa: F401

model = parity.randomize_batchnorm(rk.RepVGG_A0(input_shape=(32, 32, 3), classes=4))
plain = rk.to_deploy(model)
x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
print(parity.max_relative_difference(plain(x), model(x)))
"""


@pytest.mark.slow
def test_library_imports_and_converts_without_the_other_packages():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5


PACKAGE = os.path.join(REPO, "repvgg_keras")


def _library_imports(path):
    """(module-level, in-function) `repvgg_keras` modules the file at `path` imports;
    "__init__" stands for the package itself."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())

    def targets(node):
        if isinstance(node, ast.Import):
            return {
                a.name.split(".", 1)[1] if "." in a.name else "__init__"
                for a in node.names
                if a.name.split(".")[0] == "repvgg_keras"
            }
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "repvgg_keras":
            if node.module != "repvgg_keras":
                return {node.module.split(".", 1)[1]}
            modules = {a.name for a in node.names}
            return {
                m if os.path.exists(os.path.join(PACKAGE, f"{m}.py")) else "__init__"
                for m in modules
            }
        return set()

    top = set().union(*(targets(node) for node in tree.body))
    nested = [node for node in ast.walk(tree) if node not in tree.body]
    return top, set().union(*(targets(node) for node in nested))


def test_library_modules_import_each_other_one_way():
    graph, hidden = {}, {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            module = name[: -len(".py")]
            graph[module], inside = _library_imports(os.path.join(PACKAGE, name))
            if inside:
                hidden[module] = sorted(inside)
    assert not hidden, (
        f"imports of library modules inside functions (an import circle dodged?): {hidden}"
    )
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(
                "import circle: " + " -> ".join(path[path.index(module) :] + [module])
            )
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


OUR_PACKAGES = ("repvgg_keras", "export", "train", "bench")


def _imported_packages(node):
    """The top-level package names an import node imports from."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return {(node.module or "").split(".")[0]}
    return set()


@pytest.mark.parametrize("package, other", [("export", "train"), ("train", "export")])
def test_applications_import_one_way_and_say_why_an_import_waits(package, other):
    """`export` and `train` never import each other, and an import of our own modules inside a
    function (startup order: TensorFlow after the flags, no Keras in the client) is commented on
    its line or in the imports and comments just above it."""
    wrong, unexplained = [], []
    folder = os.path.join(REPO, package)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            source = f.read()
        lines, tree = source.splitlines(), ast.parse(source)
        imports = [node for node in ast.walk(tree) if _imported_packages(node)]
        import_lines = {n for node in imports for n in range(node.lineno, node.end_lineno + 1)}
        for node in imports:
            packages = _imported_packages(node)
            where = f"{package}/{name}:{node.lineno}"
            if other in packages:
                wrong.append(where)
            if node in tree.body or not packages & set(OUR_PACKAGES):
                continue
            line = node.lineno - 1  # 0-based index of the import's first line
            while "#" not in lines[line]:
                line -= 1
                text = lines[line].strip() if line >= 0 else "not an import"
                if not (text == "" or text.startswith("#") or line + 1 in import_lines):
                    unexplained.append(where)
                    break
    assert not wrong, f"{package} imports {other}: {wrong}"
    assert not unexplained, (
        f"imports of our modules inside functions, with no comment: {unexplained}"
    )
