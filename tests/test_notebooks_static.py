"""The committed notebooks: clean, thin, and every parameter visible to papermill."""
import json
import re
from pathlib import Path

import papermill
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_three_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_ddpm", "02_ddim", "03_dann"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_clean_and_parameters_all_declared(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), "commit notebooks clean"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    first = code[0]
    assert "parameters" in first["metadata"].get("tags", [])
    src = "".join(first["source"])
    names = re.findall(r"^(\w+) = .+  # .+$", src, flags=re.M)
    assert len(names) == len([line for line in src.splitlines() if line.strip()]), "one typed literal + comment a line"
    assert list(papermill.inspect_notebook(str(path))) == names  # papermill parses every line
    assert {"profile", "device", "seed", "interactive"} <= set(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_thin(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            assert not re.search(r"^\s*(def|class) ", src, flags=re.M), f"logic belongs in hw2lib:\n{src}"
            assert ".backward(" not in src
