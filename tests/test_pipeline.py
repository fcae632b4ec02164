import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hw2lib import pipeline
from hw2lib.pipeline import PipelineError

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def _setup(tmp_path, *folders):
    books = tmp_path / "notebooks"
    books.mkdir()
    for folder in folders:
        for nb in (FIXTURES / folder).glob("*.ipynb"):
            shutil.copy(nb, books / nb.name)
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "old.png").write_bytes(b"old figure")
    report = tmp_path / "report.md"
    report.write_text("# Report\n\n<!-- hw2:table fixture_table -->\nold\n<!-- /hw2:table -->\n\ntext stays\n")
    return books, figures, report


@pytest.mark.slow
def test_injected_parameter_reaches_notebook_and_publishes(tmp_path):
    books, figures, report = _setup(tmp_path, "notebooks_ok")
    result = pipeline.run("smoke", params={"value": 42, "label": "from-test"}, notebooks_dir=books,
                          runs_root=tmp_path / "runs", figures_dir=figures, report_path=report)
    out = result.notebooks[0].output
    assert out == tmp_path / "runs" / "smoke" / "01_ok.ipynb" and out.with_suffix(".html").is_file()
    text = out.read_text()
    assert "value is 42" in text
    meta = json.loads((tmp_path / "runs" / "smoke" / "figures" / "fixture_line.json").read_text())
    assert meta["value"] == 42 and meta["label"] == "from-test"
    assert (figures / "fixture_line.png").is_file()
    new = report.read_text()
    assert "| 42 | from-test |" in new and "text stays" in new and "old\n" not in new


@pytest.mark.slow
def test_failing_notebook_names_cell_and_leaves_outputs(tmp_path):
    books, figures, report = _setup(tmp_path, "notebooks_ok", "notebooks_fail")
    before_report = report.read_text()
    before_figs = {p.name: p.read_bytes() for p in figures.iterdir()}
    with pytest.raises(PipelineError) as err:
        pipeline.run("smoke", notebooks_dir=books, runs_root=tmp_path / "runs", figures_dir=figures,
                     report_path=report)
    msg = str(err.value)
    assert "02_fail.ipynb" in msg and "cell" in msg and "boom from the fixture" in msg and "ValueError" in msg
    assert (tmp_path / "runs" / "smoke" / "02_fail.ipynb").is_file()  # partial notebook kept
    assert report.read_text() == before_report
    assert {p.name: p.read_bytes() for p in figures.iterdir()} == before_figs


def test_unknown_parameter_and_wrong_type_rejected_before_running(tmp_path):
    books, figures, report = _setup(tmp_path, "notebooks_ok")
    with pytest.raises(PipelineError, match="unknown parameter|declared by none"):
        pipeline.run("smoke", params={"valeu": 1}, notebooks_dir=books, runs_root=tmp_path / "runs",
                     figures_dir=figures, report_path=report)
    with pytest.raises(PipelineError, match="must be int"):
        pipeline.run("smoke", params={"value": "many"}, notebooks_dir=books, runs_root=tmp_path / "runs",
                     figures_dir=figures, report_path=report)
    assert not (tmp_path / "runs" / "smoke" / "01_ok.ipynb").exists()


def test_unknown_profile_and_only(tmp_path):
    books, figures, report = _setup(tmp_path, "notebooks_ok")
    with pytest.raises(PipelineError, match="unknown profile"):
        pipeline.run("turbo", notebooks_dir=books)
    with pytest.raises(PipelineError, match="matches no notebook"):
        pipeline.run("smoke", only=["dann"], notebooks_dir=books, runs_root=tmp_path / "runs")


def test_parse_param():
    assert pipeline.parse_param("guidance=2.5") == ("guidance", 2.5)
    assert pipeline.parse_param("data_root=/data/hw2") == ("data_root", "/data/hw2")
    assert pipeline.parse_param("train=True") == ("train", True)
    with pytest.raises(PipelineError):
        pipeline.parse_param("novalue")


def test_cli_help_documents_run():
    out = subprocess.run([sys.executable, "-m", "hw2lib", "run", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for word in ("--profile", "--only", "--param", "smoke", "papermill"):
        assert word in out.stdout
