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


@pytest.fixture
def interrupt_image_save(monkeypatch):
    """``interrupt_image_save(n)``: the n-th PIL image save from now on raises KeyboardInterrupt (a user's
    Ctrl-C in the middle of writing a folder)."""
    from PIL import Image

    def install(n: int) -> None:
        real_save = Image.Image.save
        calls = {"n": 0}

        def flaky(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_save(self, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", flaky)

    return install


os.environ.setdefault("MPLBACKEND", "Agg")
