import json
from pathlib import Path

import pytest

from hw2lib import report
from hw2lib.report import ReportError

REPO = Path(__file__).resolve().parents[1]

TEXT = """# Report

Prose written by people. It stays.

<!-- hw2:table ddpm_accuracy -->
stale
<!-- /hw2:table -->

![grid](figures/ddpm_grid.png)

<!-- hw2:provenance -->
old provenance
<!-- /hw2:provenance -->

More prose.
"""


def _run(tmp_path, with_grid=True):
    run = tmp_path / "runs" / "quick"
    (run / "tables").mkdir(parents=True)
    (run / "figures").mkdir()
    (run / "tables" / "ddpm_accuracy.md").write_text("| w | acc |\n|---|---|\n| 2 | 0.97 |\n")
    meta = {"profile": "quick", "data_source": "mnistm (offline)", "device": "cpu (2 threads)", "commit": "abc",
            "date": "2026-12-04", "seed": 0, "weights": "shipped"}
    (run / "pipeline.json").write_text(json.dumps({"01_ddpm": 120}))
    (run / "tables" / "ddpm_accuracy.json").write_text(json.dumps({"rows": [{"w": 2, "acc": 0.97}], **meta}))
    if with_grid:
        (run / "figures" / "ddpm_grid.png").write_bytes(b"\x89PNG fake")
        (run / "figures" / "ddpm_grid.json").write_text(json.dumps(meta))
    return run


def test_rebuild_replaces_only_blocks_and_is_idempotent(tmp_path):
    run = _run(tmp_path)
    path, figs = tmp_path / "report.md", tmp_path / "figures"
    path.write_text(TEXT)
    report.rebuild("quick", run, path, figs)
    once = path.read_text()
    assert "| 2 | 0.97 |" in once and "stale" not in once and "old provenance" not in once
    assert "| ddpm | quick | mnistm (offline) | cpu (2 threads) | shipped | 0 | 120 | abc | 2026-12-04 |" in once
    outside = [line for line in TEXT.splitlines() if "stale" not in line and "old provenance" not in line]
    assert all(line in once.splitlines() for line in outside)
    assert (figs / "ddpm_grid.png").read_bytes() == b"\x89PNG fake"
    mtime = path.stat().st_mtime_ns
    report.rebuild("quick", run, path, figs)
    assert path.read_text() == once and path.stat().st_mtime_ns == mtime


def test_missing_artefact_fails_and_leaves_report(tmp_path):
    run = _run(tmp_path, with_grid=False)
    path, figs = tmp_path / "report.md", tmp_path / "figures"
    path.write_text(TEXT)
    with pytest.raises(ReportError, match="figures/ddpm_grid.png"):
        report.rebuild("quick", run, path, figs)
    assert path.read_text() == TEXT and not figs.exists()
    (run / "figures" / "ddpm_grid.png").write_bytes(b"x")
    (run / "tables" / "ddpm_accuracy.md").unlink()
    with pytest.raises(ReportError, match="ddpm_accuracy"):
        report.rebuild("quick", run, path, figs)
    assert path.read_text() == TEXT


def test_committed_report_links_exist_and_numbers_match_artefacts():
    text = (REPO / "report.md").read_text()
    links = report.figure_links(text)
    assert links, "report.md links no figures"
    for link in links:
        assert (REPO / link).is_file(), link
    # every generated table equals the artefact it was made from (committed in figures/tables/)
    names = report.table_names(text)
    assert names
    for name in names:
        block = text.split(f"<!-- hw2:table {name} -->\n", 1)[1].split("<!-- /hw2:table -->", 1)[0]
        artefact = (REPO / "figures" / "tables" / f"{name}.md").read_text()
        assert block.rstrip("\n") == artefact.rstrip("\n"), name
