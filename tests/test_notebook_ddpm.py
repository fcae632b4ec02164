import json
from pathlib import Path

import pytest

from hw2lib import pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddpm_notebook_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("HW2_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HW2_CHECKPOINTS", str(tmp_path / "ckpt"))
    out = tmp_path / "runs" / "smoke" / "01_ddpm.ipynb"
    out.parent.mkdir(parents=True)
    pipeline.execute(REPO / "notebooks" / "01_ddpm.ipynb", out, {"profile": "smoke", "train": True},
                     cwd=REPO / "notebooks")
    run = tmp_path / "runs" / "smoke"
    for name in ("ddpm_grid", "ddpm_reverse", "ddpm_guidance", "ddpm_loss", "ddpm_data"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000, name
        meta = json.loads((run / "figures" / f"{name}.json").read_text())
        assert meta["profile"] == "smoke" and "offline" in meta["data_source"] and meta["device"].startswith("cpu")
    table = json.loads((run / "tables" / "ddpm_accuracy.json").read_text())
    assert [r["guidance w"] for r in table["rows"]] == [2.0, 0.0]
    samples = sorted(p.name for p in (run / "ddpm_samples").iterdir())
    assert len(samples) == 30 and samples[0] == "0_001.png" and samples[-1] == "9_003.png"
