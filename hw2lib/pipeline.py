"""Run the notebooks by profile with papermill and publish their outputs.

``run(profile, only, params)`` executes ``notebooks/*.ipynb`` in name order into
``runs/<profile>/NAME.ipynb`` (cwd ``notebooks/``; kernel ``python3`` i.e. the
interpreter papermill runs in), injects ``profile`` and the overrides, exports
each executed notebook to HTML beside it and prints what runs and how long it
took.  ``figures/`` and ``report.md`` are refreshed only after every requested
notebook succeeded; a failure names the notebook and the cell, keeps the partly
executed notebook and leaves them exactly as they were.
"""
from __future__ import annotations

import ast
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import paths


class PipelineError(RuntimeError):
    pass


@dataclass
class NotebookResult:
    name: str
    output: Path
    html: Path | None
    seconds: float


@dataclass
class RunResult:
    profile: str
    run_dir: Path
    notebooks: list[NotebookResult] = field(default_factory=list)


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as a Python literal when it is one, else as a string."""
    if "=" not in text:
        raise PipelineError(f"parameter {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise PipelineError(f"parameter name {key!r} is not a Python identifier")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def find_notebooks(notebooks_dir: Path, only: Iterable[str] | None = None) -> list[Path]:
    books = sorted(p for p in notebooks_dir.glob("*.ipynb") if not p.name.startswith("."))
    if not books:
        raise PipelineError(f"no notebooks found in {notebooks_dir}")
    if only:
        chosen = []
        for name in only:
            hits = [p for p in books if name in (p.stem, p.name) or p.stem.split("_", 1)[-1] == name]
            if not hits:
                raise PipelineError(f"--only {name!r} matches no notebook; have {[p.stem for p in books]}")
            chosen.extend(h for h in hits if h not in chosen)
        books = sorted(chosen)
    return books


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    import papermill

    return papermill.inspect_notebook(str(path))


def check_params(path: Path, params: dict[str, Any]) -> None:
    """Refuse parameters the notebook does not declare, or of another type than its default."""
    declared = notebook_parameters(path)
    if not declared:
        raise PipelineError(f"{path.name} has no cell tagged 'parameters'")
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise PipelineError(f"{path.name}: unknown parameter(s) {unknown}; declared: {sorted(declared)}")
    for key, value in params.items():
        try:
            default = ast.literal_eval(declared[key]["default"])
        except (ValueError, SyntaxError):
            continue
        if default is None or value is None:
            continue
        if isinstance(default, bool) != isinstance(value, bool) or (
            not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int))
        ):
            if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
                continue
            raise PipelineError(
                f"{path.name}: parameter {key!r} must be {type(default).__name__} like its default "
                f"{default!r}, got {value!r}"
            )


def check_data_root(value: Any) -> Any:
    """``data_root`` as an absolute path (the notebooks run with cwd ``notebooks/``, so a relative path is
    taken relative to the caller's working directory here); a folder that does not exist is refused
    before any notebook runs.  ``None`` / ``""`` (the offline default) pass unchanged."""
    if value is None or value == "":
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise PipelineError(f"parameter 'data_root' must be a path string or None, got {value!r}")
    root = Path(value).expanduser()
    root = root if root.is_absolute() else Path.cwd() / root
    if not root.is_dir():
        raise PipelineError(f"data_root {root} does not exist or is not a folder; expected the course's hw2_data "
                            "folder (digits/, face/), or leave data_root unset for the offline default")
    return str(root.resolve())


def export_html(notebook: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    html = notebook.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def execute(notebook: Path, output: Path, parameters: dict[str, Any], cwd: Path, log_output: bool = False) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters, cwd=str(cwd), kernel_name="python3",
            progress_bar=sys.stderr.isatty(), log_output=log_output, request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as exc:
        cell = f"cell {exc.cell_index}" + (f" (execution count {exc.exec_count})" if exc.exec_count else "")
        first = (exc.source or "").strip().splitlines()
        where = f": `{first[0][:80]}`" if first else ""
        raise PipelineError(
            f"notebook {notebook.name} failed in {cell}{where} - {exc.ename}: {exc.evalue}\n"
            f"partly executed notebook kept at {output}"
        ) from None


def run(profile: str = "quick", only: Iterable[str] | None = None, params: dict[str, Any] | None = None,
        notebooks_dir: Path | None = None, runs_root: Path | None = None, publish: bool = True,
        html: bool = True, log_output: bool = False, figures_dir: Path | None = None,
        report_path: Path | None = None) -> RunResult:
    from .config import PROFILES

    if profile not in PROFILES:
        raise PipelineError(f"unknown profile {profile!r}; expected one of {list(PROFILES)}")
    params = dict(params or {})
    params.pop("profile", None)
    if "data_root" in params:
        params["data_root"] = check_data_root(params["data_root"])
    notebooks_dir = Path(notebooks_dir or paths.notebooks_dir())
    runs_root = Path(runs_root) if runs_root else paths.runs_dir()
    run_dir = runs_root / profile
    run_dir.mkdir(parents=True, exist_ok=True)
    books = find_notebooks(notebooks_dir, only)
    for book in books:  # fail before running anything
        check_params(book, {k: v for k, v in params.items() if k in notebook_parameters(book)} | {"profile": profile})
    unused = [k for k in params if not any(k in notebook_parameters(b) for b in books)]
    if unused:
        raise PipelineError(f"parameter(s) {unused} are declared by none of {[b.name for b in books]}")

    result = RunResult(profile, run_dir)
    old_env = os.environ.get("HW2_RUNS")
    os.environ["HW2_RUNS"] = str(runs_root)
    try:
        for i, book in enumerate(books, 1):
            declared = notebook_parameters(book)
            nb_params = {"profile": profile, **{k: v for k, v in params.items() if k in declared}}
            output = run_dir / book.name
            print(f"[{i}/{len(books)}] {book.name} (profile {profile}) -> {output}", flush=True)
            start = time.perf_counter()
            execute(book, output, nb_params, cwd=notebooks_dir, log_output=log_output)
            seconds = time.perf_counter() - start
            html_path = export_html(output) if html else None
            print(f"[{i}/{len(books)}] {book.name} done in {seconds:.1f} s", flush=True)
            result.notebooks.append(NotebookResult(book.stem, output, html_path, seconds))
    finally:
        if old_env is None:
            os.environ.pop("HW2_RUNS", None)
        else:
            os.environ["HW2_RUNS"] = old_env
    _record_times(run_dir, result)
    if publish:
        from . import report

        report.publish(profile, run_dir=run_dir, report_path=report_path, figures_dir=figures_dir)
    return result


def _record_times(run_dir: Path, result: RunResult) -> None:
    """``run_dir/pipeline.json``: seconds per notebook of the newest run (merged with earlier ``--only`` runs)."""
    import json

    from .checkpoint import atomic_write_text

    path = run_dir / "pipeline.json"
    try:
        times = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        times = {}
    for nb in result.notebooks:
        times[nb.name] = round(nb.seconds, 1)
    atomic_write_text(path, json.dumps(times, indent=2, sort_keys=True) + "\n")
