"""Notebooks in colab/: valid, stripped, compilable; executed headless when slow tests run."""

import ast
from pathlib import Path

import nbformat
import pytest

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))

# Small parameters so a headless run finishes in minutes on two CPU cores.
SMALL = {
    "01_quickstart.ipynb": {"CALIB_TOKENS": 4096, "EVAL_TOKENS": 2048, "MAX_NEW_TOKENS": 4},
    "02_partition_explorer.ipynb": {"CALIB_TOKENS": 4096, "EVAL_TOKENS": 1024, "GENERATIONS": 8, "SA_STEPS": 2000},
    "03_serving.ipynb": {"CALIB_TOKENS": 4096, "DURATION_S": 3.0, "RATES": [2.0], "MAX_TOKENS": 4,
                         "POLICIES": ["fcfs", "per_row"]},
}


def test_three_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_partition_explorer.ipynb", "03_serving.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_stripped(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert code, "no code cells"
  for cell in code:
    assert not cell.get("outputs"), f"cell outputs are not stripped: {cell.source[:60]!r}"
    assert cell.get("execution_count") is None, "execution counts are not stripped"
    compile(cell.source, f"{path.name} cell", "exec")
  tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "expected exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_sets_small_overrides(path):
  notebook = nbformat.read(path, as_version=4)
  params = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
  assigned = {t.id for node in ast.parse(params.source).body if isinstance(node, ast.Assign) for t in node.targets}
  missing = set(SMALL[path.name]) - assigned
  assert not missing, f"parameters cell does not define {sorted(missing)}"


def inject_parameters(notebook, overrides: dict, workdir: Path):
  """Insert a cell after the parameters cell that overrides them, as papermill does."""
  index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
  lines = [f"{name} = {value!r}" for name, value in {**overrides, "OUT": str(workdir / "out")}.items()]
  cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
  notebook.cells.insert(index + 1, cell)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(path, tmp_path):
  from nbclient import NotebookClient

  notebook = nbformat.read(path, as_version=4)
  inject_parameters(notebook, SMALL[path.name], tmp_path)
  client = NotebookClient(notebook, timeout=1200, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
