"""The fault matrix of ``docs/reliability.md``: the faults no other test file covers.

Interrupted runs (SIGKILL during training, a failing disk write, an interrupted generation),
hostile and broken files given to every loader behind an entry point, bad image data and
pipeline parameters, entry points given a non-empty output folder, and the determinism of
the arrays behind every figure of the smoke runs.  Each test names the fault it proves.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hw2lib import checkpoint, config, course_unet, dann, ddim, ddpm, diffusion, digits, pipeline, plots
from hw2lib.__main__ import main
from hw2lib.checkpoint import CheckpointError
from hw2lib.digits import DataError
from hw2lib.pipeline import PipelineError
from hw2lib.unet import build_unet

REPO = Path(__file__).resolve().parents[1]


def smoke_cfg(**kw):
    return config.from_params("ddpm", profile="smoke", **kw)


def save_ddpm_checkpoint(path: Path, cfg) -> Path:
    """A training-style checkpoint (model + EMA + config) of ``cfg``'s UNet."""
    torch.manual_seed(0)
    state = build_unet(cfg).state_dict()
    return checkpoint.save(path, {"model": state, "ema": state}, config=config.as_dict(cfg), step=1)


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (dot-names) that a write left behind."""
    return sorted(p.name for p in folder.rglob(".*"))


# =========================================================================== faults to survive
# --------------------------------------------------------------------------- SIGKILL mid-training
TRAIN_STEPS, EVERY = 20, 5


def _train_cmd() -> list[str]:
    return [sys.executable, "-m", "hw2lib", "train", "ddpm", "--profile", "smoke", "-p", f"train_steps={TRAIN_STEPS}",
            "-p", f"checkpoint_every={EVERY}", "--no-export", "--threads", "1"]


def _train_env(ckpt_root: Path) -> dict[str, str]:
    env = dict(os.environ, HW2_CHECKPOINTS=str(ckpt_root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("HW2_DATA_ROOT", None)
    return env


def _only_checkpoint(ckpt_root: Path) -> Path:
    found = sorted(ckpt_root.glob("ddpm_smoke_*/latest.pt"))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_sigkill_during_training_resumes_to_identical_weights(tmp_path):
    """SIGKILL in the middle of `python -m hw2lib train`: the checkpoint on disk is whole, the rerun resumes
    from it, and the final weights equal those of an uninterrupted run (CPU, same seed)."""
    full_root, killed_root = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(_train_cmd(), env=_train_env(full_root), cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    full = checkpoint.load(_only_checkpoint(full_root))
    assert full["step"] == TRAIN_STEPS

    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(_train_cmd(), env=_train_env(killed_root), cwd=tmp_path, stdout=log, stderr=log)
        deadline = time.monotonic() + 900
        try:
            while proc.poll() is None and not list(killed_root.glob("ddpm_smoke_*/latest.pt")):
                assert time.monotonic() < deadline, "no checkpoint appeared within 900 s"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    path = _only_checkpoint(killed_root)
    interrupted = checkpoint.load(path)  # never half-written: it loads, and holds a step the loop saved
    assert interrupted["step"] % EVERY == 0 and 0 < interrupted["step"] < TRAIN_STEPS

    again = subprocess.run(_train_cmd(), env=_train_env(killed_root), cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {interrupted['step']}" in again.stdout
    resumed = checkpoint.load(path)
    assert resumed["step"] == TRAIN_STEPS
    for part in ("model", "ema"):
        assert list(resumed[part]) == list(full[part])
        for key, value in full[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key} differs after kill + resume"
    assert torch.equal(resumed["generator"], full["generator"])


# --------------------------------------------------------------------------- disk write failing
def _fail_nth_fsync(monkeypatch, n: int) -> None:
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(28, "No space left on device (simulated)")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failing_write", [1, 2, 3], ids=["png", "json", "npz"])
def test_failing_figure_write_keeps_previous_figure(tmp_path, monkeypatch, failing_write):
    """Disk full while saving a figure (its PNG, sidecar or arrays): every previous file stays as it was."""
    import matplotlib.pyplot as plt

    monkeypatch.setenv("HW2_RUNS", str(tmp_path / "runs"))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = plots.save_figure(fig, "fig", "smoke", {"seed": 0}, arrays={"y": np.arange(3)})
    folder = png.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["fig.json", "fig.npz", "fig.png"]
    ax.plot([0, 1], [1, 0])
    _fail_nth_fsync(monkeypatch, failing_write)
    with pytest.raises(OSError, match="No space left"):
        plots.save_figure(fig, "fig", "smoke", {"seed": 1}, arrays={"y": np.arange(5)})
    monkeypatch.undo()
    plt.close(fig)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # intact, and no temporary file


def test_failing_table_write_keeps_previous_table(tmp_path, monkeypatch):
    """Disk full while saving a table: its markdown and JSON stay as they were."""
    monkeypatch.setenv("HW2_RUNS", str(tmp_path / "runs"))
    path = plots.save_table([{"w": 1, "acc": 0.5}], "tab", "smoke")
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    _fail_nth_fsync(monkeypatch, 2)
    with pytest.raises(OSError, match="No space left"):
        plots.save_table([{"w": 2, "acc": 0.9}], "tab", "smoke")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_failing_prediction_csv_write_keeps_previous_csv(tmp_path, monkeypatch):
    """Disk full while dann-predict overwrites its CSV: the previous CSV is intact."""
    out = tmp_path / "pred.csv"
    dann.write_predictions(out, ["a.png", "b.png"], [1, 2])
    before = out.read_bytes()
    _fail_nth_fsync(monkeypatch, 1)
    with pytest.raises(OSError, match="No space left"):
        dann.write_predictions(out, ["a.png", "b.png"], [7, 8], overwrite=True)
    monkeypatch.undo()
    assert out.read_bytes() == before and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_infinite_loss_stops_naming_step_and_keeps_last_checkpoint(tmp_path, monkeypatch, one_thread, bad):
    """The loss becoming +-inf: training stops at once naming the step; the last good checkpoint stays newest."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 3, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (32,), generator=g)
    cfg = smoke_cfg(train_steps=6, checkpoint_every=2, batch_size=4)
    path = tmp_path / "run" / "latest.pt"
    diffusion.train(build_unet(cfg), x, y, cfg, "ddpm", path, "cpu", progress=False, stop_after=2)
    before = path.read_bytes()
    real = diffusion.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * 0 + bad if calls["n"] == 2 else loss  # resumed at step 2: the 2nd call is step 4

    monkeypatch.setattr(diffusion, "diffusion_loss", poisoned)
    with pytest.raises(diffusion.TrainingDiverged, match=r"loss became -?inf at step 4") as err:
        diffusion.train(build_unet(cfg), x, y, cfg, "ddpm", path, "cpu", progress=False)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before and checkpoint.latest(path.parent) == path
    assert checkpoint.load(path)["step"] == 2 and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- interrupted generation
def test_interrupted_face_folder_overwrite_keeps_previous_folder(tmp_path, interrupt_image_save):
    """ddim-faces interrupted while writing (with --overwrite): the previous output folder is whole and
    no half-written folder is left to be mistaken for a finished one."""
    out = tmp_path / "faces"
    images = np.zeros((3, 8, 8, 3), np.uint8)
    ddim.write_image_folder(images, ["00.png", "01.png", "02.png"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_image_save(2)
    with pytest.raises(KeyboardInterrupt):
        ddim.write_image_folder(images + 255, ["00.png", "01.png", "02.png"], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]


# =========================================================================== hostile or broken files
class _CreatesFile:
    """Unpickling this would create ``target`` (a stand-in for any code a pickle can run)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _load_ddpm_file(path):
    return ddpm.load_model_file(path, smoke_cfg())


def _load_course_unet(path):
    return course_unet.load_course_unet(path)


def _load_dann(path):
    return dann.load_for_prediction(path, "svhn")


LOADERS = {"ddpm-generate checkpoint": _load_ddpm_file, "ddim-faces UNet.pt": _load_course_unet,
           "dann-predict checkpoint": _load_dann}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_code_carrying_pickle_is_refused_by_every_entry_point_loader(tmp_path, loader, fmt):
    """A checkpoint whose unpickling would create a file: refused with the file named; the file is not created."""
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    payload = {"model": {"w": torch.zeros(2)}, "config": {"x": _CreatesFile(marker)}}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        LOADERS[loader](path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "random bytes", "truncated"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_broken_checkpoint_is_named_by_every_entry_point_loader(tmp_path, loader, damage):
    """Empty, random-bytes and truncated checkpoints: a CheckpointError naming the file."""
    path = tmp_path / "model.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:
        save_ddpm_checkpoint(path, smoke_cfg())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        LOADERS[loader](path)
    assert str(path) in str(err.value)


def test_ddpm_generate_refuses_checkpoint_of_another_architecture(tmp_path, capsys):
    """ddpm-generate given a checkpoint made for another config: the differing keys are named, nothing written."""
    ckpt = save_ddpm_checkpoint(tmp_path / "quick.pt", config.from_params("ddpm", profile="quick"))
    out = tmp_path / "out"
    assert main(["ddpm-generate", str(out), "--checkpoint", str(ckpt), "--profile", "smoke", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and "another config" in err and "base_channels" in err and "time_dim" in err
    assert not out.exists()


def test_ddpm_generate_names_missing_and_extra_state_dict_keys(tmp_path, capsys):
    """A checkpoint of the right config whose state_dict lacks / adds keys: both lists in the message."""
    cfg = smoke_cfg()
    state = dict(build_unet(cfg).state_dict())
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["extra.weight"] = torch.zeros(1)
    ckpt = checkpoint.save(tmp_path / "keys.pt", {"ema": state}, config=config.as_dict(cfg))
    out = tmp_path / "out"
    assert main(["ddpm-generate", str(out), "--checkpoint", str(ckpt), "--profile", "smoke", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert str(ckpt) in err and f"missing keys [{dropped}]" in err and "unexpected keys [extra.weight]" in err
    assert not out.exists()


def test_ddpm_generate_refuses_non_empty_output_folder(tmp_path, capsys):
    """ddpm-generate into an existing non-empty folder: refused before any work; old files untouched."""
    ckpt = save_ddpm_checkpoint(tmp_path / "smoke.pt", smoke_cfg())
    out = tmp_path / "out"
    out.mkdir()
    (out / "0_001.png").write_bytes(b"an older run")
    argv = ["ddpm-generate", str(out), "--checkpoint", str(ckpt), "--profile", "smoke", "--device", "cpu"]
    started = time.perf_counter()
    assert main(argv) == 1
    assert time.perf_counter() - started < 5  # refused before loading the model or sampling
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["0_001.png"] and (out / "0_001.png").read_bytes() == b"an older run"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- images and CSVs
def _write_course_split(root: Path, names: list[str], header: str = "image_name,label") -> Path:
    folder = root / "digits" / "mnistm"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = [header] + [f"{n},{i % 10}" for i, n in enumerate(names)]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def generated(tmp_path, monkeypatch):
    monkeypatch.setenv("HW2_DATA", str(tmp_path / "generated"))
    monkeypatch.delenv("HW2_DATA_ROOT", raising=False)
    return tmp_path


def test_sixteen_bit_grey_png_is_scaled_not_clipped(generated):
    """A 16-bit grey PNG: scaled to 8 bits (65535 -> 255), not clipped to white by PIL's conversion."""
    folder = _write_course_split(generated, ["a.png"])
    raw = (np.arange(28 * 28).reshape(28, 28) * 83).astype(np.uint16)
    Image.fromarray(raw).save(folder / "data" / "a.png")
    assert Image.open(folder / "data" / "a.png").mode.startswith("I")
    ds = digits.load_domain("mnistm", "train", source="course", data_root=generated)
    expected = np.round(raw / 257.0).astype(np.uint8)
    assert np.abs(ds.images[0, ..., 0].astype(int) - expected).max() <= 1
    assert np.array_equal(ds.images[0, ..., 0], ds.images[0, ..., 2])


@pytest.mark.parametrize("mode", ["CMYK", "F"])
def test_image_of_unsupported_mode_names_file_and_mode(generated, mode):
    """A file in the image folder that decodes to a mode that is neither grey nor RGB (CMYK, float)."""
    folder = _write_course_split(generated, ["a.png"])
    fmt = "JPEG" if mode == "CMYK" else "TIFF"  # PNG cannot hold them; PIL reads by content, not by name
    Image.new(mode, (28, 28)).save(folder / "data" / "a.png", format=fmt)
    with pytest.raises(DataError, match=rf"a\.png has mode {mode}; expected grey"):
        digits.load_domain("mnistm", "train", source="course", data_root=generated)


def test_truncated_png_names_file(generated):
    """A PNG cut short (a copy interrupted): a DataError naming it, not a partly black image."""
    folder = _write_course_split(generated, ["a.png"])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / "data" / "a.png")
    data = (folder / "data" / "a.png").read_bytes()
    (folder / "data" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a\.png is corrupt or not an image"):
        digits.load_domain("mnistm", "train", source="course", data_root=generated)


def test_csv_missing_label_column_and_short_row(generated):
    """A CSV without the label column, and a row with too few columns: errors naming file (and row)."""
    folder = _write_course_split(generated, ["a.png"], header="image_name")
    (folder / "train.csv").write_text("image_name\na.png\n")
    with pytest.raises(DataError, match=r"train\.csv has columns \['image_name'\]; expected columns"):
        digits.load_domain("mnistm", "train", source="course", data_root=generated)
    (folder / "train.csv").write_text("image_name,label\na.png,1\nb.png\n")
    with pytest.raises(DataError, match=r"train\.csv row 3: \['b\.png'\] has too few columns"):
        digits.load_domain("mnistm", "train", source="course", data_root=generated)


# --------------------------------------------------------------------------- pipeline parameters
def test_pipeline_refuses_missing_data_root_before_running(tmp_path):
    """`python -m hw2lib run -p data_root=...` naming a folder that does not exist: refused before any notebook
    runs; nothing is written."""
    runs = tmp_path / "runs"
    with pytest.raises(PipelineError, match=r"data_root .*nowhere does not exist"):
        pipeline.run("smoke", params={"data_root": str(tmp_path / "nowhere")}, runs_root=runs,
                     figures_dir=tmp_path / "figures", report_path=tmp_path / "report.md")
    assert not runs.exists() and not (tmp_path / "figures").exists()


def test_pipeline_data_root_relative_to_caller_not_notebooks(tmp_path, monkeypatch):
    """A relative data_root means the caller's folder (the kernels run in notebooks/): it is made absolute."""
    (tmp_path / "hw2_data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert pipeline.check_data_root("hw2_data") == str(tmp_path / "hw2_data")
    assert pipeline.check_data_root(None) is None
    with pytest.raises(PipelineError, match="must be a path"):
        pipeline.check_data_root(5)


@pytest.mark.parametrize("part", ["ddpm", "dann"])
def test_notebook_data_root_that_does_not_exist_names_it(tmp_path, monkeypatch, part):
    """A notebook run directly (papermill, JupyterLab) with a `data_root` that does not exist: its data
    loading names the missing folder and the expected layout instead of falling back to other data."""
    monkeypatch.setenv("HW2_DATA", str(tmp_path / "generated"))
    cfg = config.from_params(part, profile="smoke", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"data_root .*nowhere does not exist or is not a folder") as err:
        {"ddpm": ddpm.load_data, "dann": dann.load_data}[part](cfg)
    assert "expected layout" in str(err.value)
    assert not (tmp_path / "generated").exists()


# =========================================================================== determinism
NOTEBOOKS = ["01_ddpm", "02_ddim", "03_dann"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Each notebook's smoke profile executed twice, each run with its own fresh runs and checkpoints folders.

    Returns {notebook: (run_dir_a, run_dir_b)} for the notebooks that exist.
    """
    base = tmp_path_factory.mktemp("determinism")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HW2_DATA_ROOT", raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")
        for name in NOTEBOOKS:
            book = REPO / "notebooks" / f"{name}.ipynb"
            if not book.is_file():
                continue
            declared = pipeline.notebook_parameters(book)
            params = {"profile": "smoke", **({"train": True} if "train" in declared else {})}
            dirs = []
            for run in ("a", "b"):
                root = base / name / run
                mp.setenv("HW2_RUNS", str(root / "runs"))
                mp.setenv("HW2_CHECKPOINTS", str(root / "checkpoints"))
                run_dir = root / "runs" / "smoke"
                run_dir.mkdir(parents=True)
                pipeline.execute(book, run_dir / book.name, params, cwd=REPO / "notebooks")
                dirs.append(run_dir)
            out[name] = tuple(dirs)
    return out


VOLATILE = ("second", "images/s", "date", "commit")


def _stable_rows(path: Path) -> list[dict]:
    import json

    rows = json.loads(path.read_text())["rows"]
    return [{k: v for k, v in row.items() if not any(w in k for w in VOLATILE)} for row in rows
            if not any(w in str(row.get("item", "")) for w in VOLATILE)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_smoke_runs_give_identical_figure_arrays(smoke_runs, name):
    """Same seed, same device (CPU): two smoke runs of a notebook give identical arrays behind every figure
    (figures/*.npz) and identical table rows (timings aside); every figure and table records the seed."""
    import json

    if name not in smoke_runs:
        pytest.skip(f"notebooks/{name}.ipynb is not in this checkout")
    a, b = smoke_runs[name]
    npz = sorted(p.name for p in (a / "figures").glob("*.npz"))
    assert npz, f"{name} saved no arrays behind its figures"
    assert npz == sorted(p.name for p in (b / "figures").glob("*.npz"))
    for file in npz:
        with np.load(a / "figures" / file) as za, np.load(b / "figures" / file) as zb:
            assert sorted(za.files) == sorted(zb.files), file
            for key in za.files:
                x, y = za[key], zb[key]
                assert x.dtype == y.dtype and x.shape == y.shape, f"{file}:{key}"
                assert np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"), f"{file}:{key} differs between runs"
    tables = sorted(p.name for p in (a / "tables").glob("*.json"))
    assert tables == sorted(p.name for p in (b / "tables").glob("*.json"))
    for file in tables:
        assert _stable_rows(a / "tables" / file) == _stable_rows(b / "tables" / file), file
    for sidecar in [*(a / "figures").glob("*.json"), *(a / "tables").glob("*.json")]:
        assert json.loads(sidecar.read_text())["seed"] == 0, sidecar.name
