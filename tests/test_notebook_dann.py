"""notebooks/03_dann.ipynb runs end to end under papermill with the smoke profile."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "03_dann.ipynb"
FIGURES = ["dann_samples", "dann_curves", "dann_tsne_svhn_class", "dann_tsne_svhn_domain", "dann_tsne_usps_class",
           "dann_tsne_usps_domain"]


@pytest.mark.slow
def test_dann_notebook_smoke(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("HW2_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HW2_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = tmp_path / "03_dann.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters={"profile": "smoke"}, cwd=str(NOTEBOOK.parent),
                               kernel_name="python3", progress_bar=False)

    run = tmp_path / "runs" / "smoke"
    for name in FIGURES:
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000, name
        meta = json.loads((run / "figures" / f"{name}.json").read_text())
        assert meta["data_source"] and meta["device"] and meta["config"]["profile"] == "smoke"
    with np.load(run / "figures" / "dann_tsne_usps_domain.npz") as z:
        assert z["dann_embedding"].shape[1] == 2 and set(np.unique(z["dann_domain"])) == {0, 1}
    with np.load(run / "figures" / "dann_curves.npz") as z:
        assert "usps_dann_domain_acc" in z.files and "svhn_dann_lambda" in z.files

    table = json.loads((run / "tables" / "dann_accuracy.json").read_text())
    assert table["columns"] == ["method", "MNIST-M → SVHN", "MNIST-M → USPS"]
    assert [r["method"] for r in table["rows"]][:3] == ["source-only", "DANN", "target-only"]
    for row in table["rows"][:3]:
        for col in table["columns"][1:]:
            assert re.fullmatch(r"[01]\.\d{4} \(\d+/\d+\)", row[col]), row
    assert table["data_source"]
    assert (run / "tables" / "dann_accuracy.md").read_text().startswith("| method |")
    pad = json.loads((run / "tables" / "dann_pad.json").read_text())
    assert len(pad["rows"]) == 2 and all(-2.0 <= r["PAD DANN"] <= 2.0 for r in pad["rows"])

    # the trained DANN models are where dann-predict looks for them
    for target in ("svhn", "usps"):
        assert (tmp_path / "checkpoints" / f"dann_{target}_smoke.pt").is_file()
