"""Rebuild the generated blocks of ``report.md`` and ``figures/`` from a finished run.

``report.md`` is prose written by people plus generated blocks::

    <!-- hw2:table NAME -->  ...  <!-- /hw2:table -->      # runs/<profile>/tables/NAME.md
    <!-- hw2:provenance -->  ...  <!-- /hw2:provenance --> # per part: profile, data, device, seconds, commit, date

``rebuild`` rewrites only those blocks, and copies the run's figures into
``figures/`` and its tables into ``figures/tables/`` (so that every number in the
committed report has its committed artefact).  Everything is checked before anything is written: a block or a figure
link whose artefact the run lacks is an error naming it, and ``report.md`` and
``figures/`` stay as they were.  Running it twice changes nothing.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from . import paths
from .checkpoint import atomic_write_bytes, atomic_write_text

BLOCK = re.compile(r"(<!-- hw2:table (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /hw2:table -->)", re.S)
PROVENANCE = re.compile(r"(<!-- hw2:provenance -->\n)(?P<body>.*?)(<!-- /hw2:provenance -->)", re.S)
FIGURE_LINK = re.compile(r"\]\((figures/[^)\s]+\.png)\)")


class ReportError(RuntimeError):
    pass


def table_names(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def figure_links(text: str) -> list[str]:
    return FIGURE_LINK.findall(text)


def _part_of(name: str) -> str:
    return name.split("_", 1)[0]


def provenance_block(run_dir: Path) -> str:
    """One row per part from the sidecars of the run's tables and figures."""
    parts: dict[str, dict] = {}
    for sidecar in sorted((run_dir / "tables").glob("*.json")) + sorted((run_dir / "figures").glob("*.json")):
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"cannot read artefact sidecar {sidecar}: {exc}") from None
        part = _part_of(sidecar.stem)
        row = parts.setdefault(part, {"seconds": 0.0})
        for key in ("profile", "data_source", "device", "commit", "date", "weights", "seed"):
            if meta.get(key) is not None and key not in row:
                row[key] = meta[key]
        if meta.get("notebook_seconds") is not None:
            row["seconds"] = max(row["seconds"], float(meta["notebook_seconds"]))
    times_path = run_dir / "pipeline.json"
    if times_path.is_file():
        for notebook, seconds in json.loads(times_path.read_text()).items():
            part = notebook.split("_", 1)[-1]
            if part in parts:
                parts[part]["seconds"] = float(seconds)
    lines = ["| part | profile | data | device | model / weights | seed | notebook seconds | commit | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    for part, row in sorted(parts.items()):
        lines.append("| " + " | ".join(str(x) for x in (
            part, row.get("profile", ""), row.get("data_source", ""), row.get("device", ""), row.get("weights", ""),
            row.get("seed", ""), f"{row['seconds']:.0f}" if row["seconds"] else "", row.get("commit", ""),
            row.get("date", ""))) + " |")
    return "\n".join(lines) + "\n"


def render(text: str, run_dir: Path) -> str:
    """``text`` with every generated block replaced from ``run_dir``; raises before changing anything."""
    missing = [n for n in table_names(text) if not (run_dir / "tables" / f"{n}.md").is_file()]
    missing += [link for link in figure_links(text) if not (run_dir / link).is_file()]
    if missing:
        raise ReportError(f"run {run_dir} lacks artefact(s) the report needs: {', '.join(missing)}; "
                          "report.md and figures/ were left unchanged")

    def table(m: re.Match) -> str:
        body = (run_dir / "tables" / f"{m.group('name')}.md").read_text()
        return m.group(1) + body.rstrip("\n") + "\n" + m.group(4)

    out = BLOCK.sub(table, text)
    if PROVENANCE.search(out):
        prov = provenance_block(run_dir)
        out = PROVENANCE.sub(lambda m: m.group(1) + prov + m.group(3), out)
    return out


def rebuild(profile: str = "quick", run_dir: Path | None = None, report_path: Path | None = None,
            figures_dir: Path | None = None) -> Path:
    """Rewrite the generated blocks of ``report_path`` and refresh ``figures_dir`` from ``run_dir``."""
    run_dir = Path(run_dir or paths.runs_dir(profile))
    report_path = Path(report_path or paths.report_path())
    figures_dir = Path(figures_dir or paths.figures_dir())
    if not run_dir.is_dir():
        raise ReportError(f"no run folder {run_dir}; run `python -m hw2lib run --profile {profile}` first")
    text = report_path.read_text(encoding="utf-8") if report_path.is_file() else ""
    new_text = render(text, run_dir) if text else text
    # figures first (each atomically), then the report text (atomically)
    figures_dir.mkdir(parents=True, exist_ok=True)
    copies = [(src, figures_dir / src.name) for pattern in ("*.png", "*.json")
              for src in sorted((run_dir / "figures").glob(pattern))]
    copies += [(src, figures_dir / "tables" / src.name) for pattern in ("*.md", "*.json")
               for src in sorted((run_dir / "tables").glob(pattern))]
    for src, dst in copies:
        data = src.read_bytes()
        if not dst.is_file() or dst.read_bytes() != data:
            atomic_write_bytes(dst, data)
    if text and new_text != text:
        atomic_write_text(report_path, new_text)
    return report_path


def publish(profile: str, run_dir: Path | None = None, report_path: Path | None = None,
            figures_dir: Path | None = None) -> Path:
    """Called by the pipeline after every notebook succeeded."""
    return rebuild(profile, run_dir, report_path, figures_dir)


def add_cli(sub) -> None:
    p = sub.add_parser("report", help="rebuild report.md's generated blocks and figures/ from a run",
                       description="Rewrite only the generated blocks of report.md from runs/<profile>/ and copy "
                                   "that run's figures into figures/. Running it twice changes nothing.")
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"])
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import sys

    try:
        path = rebuild(args.profile)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"rebuilt {path} and {paths.figures_dir()} from {paths.runs_dir(args.profile)}")
    return 0


__all__ = ["rebuild", "publish", "render", "ReportError", "shutil"]
