import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COURSE = REPO.parent / "shared" / "course"


@pytest.fixture
def course_dir() -> Path:
    if not COURSE.is_dir():
        pytest.skip(f"course reference files not found at {COURSE}")
    return COURSE


@pytest.fixture
def isolated_dirs(tmp_path, monkeypatch):
    """Runs, checkpoints and generated data under tmp_path."""
    for name in ("HW2_RUNS", "HW2_CHECKPOINTS"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return tmp_path


os.environ.setdefault("MPLBACKEND", "Agg")
