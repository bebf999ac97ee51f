"""Type checkers see batchlab's real signatures; ``import batchlab`` stays light."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import batchlab

INIT = Path(batchlab.__file__)


def test_import_loads_neither_torch_nor_matplotlib():
    code = "import sys, batchlab; print(','.join(m for m in ('torch', 'matplotlib', 'pandas') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"import batchlab loaded {loaded}"


def _type_checking_names() -> set[str]:
    """The names the ``if TYPE_CHECKING:`` block of __init__.py imports."""
    tree = ast.parse(INIT.read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.asname or alias.name for node in block.body for alias in node.names}


def _type_checking_sources() -> dict[str, str]:
    """Each name the ``if TYPE_CHECKING:`` block imports -> the module it imports it from."""
    tree = ast.parse(INIT.read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    sources = {}
    for node in block.body:
        for alias in node.names:
            module = f"batchlab.{node.module}" if isinstance(node, ast.ImportFrom) and node.module else None
            sources[alias.asname or alias.name] = module or f"batchlab.{alias.name}"
    return sources


def test_the_typed_names_the_lazy_names_and_all_agree():
    lazy = set(batchlab._EXPORTS)
    assert _type_checking_names() == lazy | batchlab._SUBMODULES
    assert set(batchlab.__all__) == lazy | {"__version__"}


def test_each_public_name_is_the_object_type_checkers_are_told_it_is():
    # What `import batchlab as bl; bl.fit` resolves to at run time must be the very object that the
    # TYPE_CHECKING imports name (the lazy table could point a name at another module's namesake).
    for name, module in _type_checking_sources().items():
        if name in batchlab._SUBMODULES:
            assert getattr(batchlab, name) is importlib.import_module(module), name
        else:
            assert getattr(batchlab, name) is getattr(importlib.import_module(module), name), name
    assert batchlab.__version__ == importlib.metadata.version("batchlab")


def test_package_ships_py_typed():
    assert (INIT.parent / "py.typed").is_file()
    pyproject = (INIT.parents[2] / "pyproject.toml").read_text()
    assert 'batchlab = ["py.typed"]' in pyproject


SAMPLE = """
import batchlab as bl

ds = bl.load_dataset("blobs")
model = bl.build_model("mlp", ds, seed=0)
run = bl.fit(model, ds, bl.TrainConfig(batch_size=32, epochs=2))
reveal_type(bl.fit)
reveal_type(bl.run_study)
reveal_type(bl.TrainConfig)
reveal_type(run)
bl.fit(model, ds, {"batch_size": 32})
bl.TrainConfig(batch_size=[1])
"""

# Third-party packages are skipped (their types become Any): this checks batchlab's surface, and
# analysing torch would take minutes.
MYPY_INI = """
[mypy]
follow_imports = silent
ignore_missing_imports = True
[mypy-torch.*,numpy.*,pandas.*,matplotlib.*,sklearn.*,scipy.*,mnist1d.*,rich.*,typer.*,click.*,pydantic_core.*]
follow_imports = skip
"""


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install batchlab[test])")
def test_mypy_sees_real_signatures_and_reports_wrong_calls(tmp_path):
    (tmp_path / "sample.py").write_text(textwrap.dedent(SAMPLE))
    (tmp_path / "mypy.ini").write_text(MYPY_INI)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "sample.py"],
        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(INIT.parents[1]), "PATH": ""},
    )
    lines = result.stdout.splitlines()
    revealed = {int(line.split(":")[1]): line for line in lines if "Revealed type" in line}
    assert 'dataset: batchlab.data.Dataset, config: batchlab.config.TrainConfig | None' in revealed[7], revealed
    assert "(config: batchlab.config.StudyConfig" in revealed[8] and revealed[8].endswith('Study"'), revealed[8]
    assert "batch_size: int | Literal['full']" in revealed[9]
    assert '"batchlab.record.Run"' in revealed[10]
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 2, lines
    assert 'Argument 3 to "fit" has incompatible type "dict[str, int]"' in errors[0]
    assert 'Argument "batch_size" to "TrainConfig"' in errors[1]
