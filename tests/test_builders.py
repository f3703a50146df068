"""The named builders: one per row of the spec table, visible to type checkers and `help()`."""

import ast
import inspect
import os
import pydoc
import subprocess
import sys

import repvgg_keras as rk
from repvgg_keras import builders
from tests.helpers import REPO


def _summary(spec):
    """The docstring line each builder carries, from its row of the table."""
    extra = (f", groups {spec.groups}" if spec.groups > 1 else "") + (", SE" if spec.use_se else "")
    return (
        f"{spec.name}: blocks {spec.num_blocks}, widths {spec.stage_widths}{extra}, "
        f"trained at {spec.default_size} px."
    )


def test_every_spec_has_exactly_one_builder_and_every_builder_a_spec():
    with open(builders.__file__, encoding="utf-8") as f:
        defined = [
            node.name
            for node in ast.parse(f.read()).body
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
        ]
    assert defined == list(rk.SPECS), "builders.py: one def per SPECS row, in table order"
    assert builders.__all__ == list(builders.BUILDERS) == list(rk.SPECS) == rk.list_models()
    assert rk.BUILDERS is builders.BUILDERS
    for name, builder in rk.BUILDERS.items():
        assert getattr(rk, name) is builder and builder.__name__ == name
        assert name in rk.__all__ and name in dir(rk)


def test_each_builder_builds_the_spec_of_its_name(monkeypatch):
    calls = []
    monkeypatch.setattr(builders, "RepVGG", lambda *args, **kwargs: calls.append((args, kwargs)))
    for name, builder in rk.BUILDERS.items():
        builder(False, classes=None, deploy=True)
        assert calls.pop() == ((name, False), {"classes": None, "deploy": True})
        assert builder.__doc__.splitlines()[0] == _summary(rk.get_spec(name))


def test_a_builder_builds_a_real_model_positionally_as_keras_applications():
    model = rk.RepVGG_A0(False, input_shape=(32, 32, 3), pooling="avg")
    assert model.name == "RepVGG_A0" and model.output_shape == (None, 1280)


def test_help_and_inspect_show_the_arguments_of_RepVGG():
    expected = list(inspect.signature(rk.RepVGG).parameters)[1:]
    for builder in rk.BUILDERS.values():
        assert list(inspect.signature(builder).parameters) == expected
    page = pydoc.render_doc(rk, renderer=pydoc.plaintext)
    assert all(f"{name}(include_top=True" in page for name in rk.BUILDERS)


USER_SNIPPET = """\
import repvgg_keras as rk

model = rk.RepVGG_A0(input_shape=(64, 64, 3), classes=10)
reveal_type(rk.RepVGG_B1g4)
rk.RepVGG_D2se(clases=10)
"""


def test_mypy_sees_the_builders_and_their_arguments(tmp_path):
    snippet = tmp_path / "user.py"
    snippet.write_text(USER_SNIPPET)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports"]
        + ["--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(snippet)],
        cwd=REPO,  # mypy reads the package from the tree (the installed one has no py.typed)
        env={**os.environ, "MYPYPATH": REPO},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert "No module named mypy" not in out, "mypy is missing: pip install -e '.[test]'"
    assert "has no attribute" not in out, out
    revealed = [line for line in out.splitlines() if "Revealed type" in line]
    assert len(revealed) == 1 and "include_top" in revealed[0], out  # read from the package
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1 and 'Unexpected keyword argument "clases"' in errors[0], out
