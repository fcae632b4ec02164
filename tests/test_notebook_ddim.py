import json
from pathlib import Path

import nbformat
import pytest
import torch

from hw2lib import pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("interactive", [False, True])
def test_ddim_notebook_smoke(tmp_path, monkeypatch, interactive):
    monkeypatch.setenv("HW2_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HW2_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.delenv("HW2_DATA_ROOT", raising=False)
    run = tmp_path / "runs" / "smoke"
    out = run / "02_ddim.ipynb"
    out.parent.mkdir(parents=True)
    pipeline.execute(REPO / "notebooks" / "02_ddim.ipynb", out, {"profile": "smoke", "interactive": interactive},
                     cwd=REPO / "notebooks")
    for name in ("ddim_eta", "ddim_interpolation", "ddim_loss"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000, name
        meta = json.loads((run / "figures" / f"{name}.json").read_text())
        assert meta["profile"] == "smoke" and "offline" in meta["data_source"] and meta["device"].startswith("cpu")
        assert "face DDPM" in meta["weights"] or "trained here" in meta["weights"]
    table = json.loads((run / "tables" / "ddim_setup.json").read_text())
    items = {r["item"]: r["value"] for r in table["rows"]}
    assert "face DDPM" in items["model"] and items["convention"].startswith("ermon")
    assert not (run / "tables" / "ddim_mse.json").exists()  # no course data
    noises = sorted(p.name for p in (run / "ddim_noise").glob("*.pt"))
    assert noises == ["00.pt", "01.pt"]
    assert torch.load(run / "ddim_noise" / "00.pt", weights_only=True).shape == (1, 3, 16, 16)
    nb = nbformat.read(str(out), as_version=4)
    sliders = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
               and o["data"].get("text/plain", "").startswith("Explorer(")]  # (progress bars are widgets too)
    assert len(sliders) == (2 if interactive else 0)


class ConvEps(torch.nn.Module):
    """eps(x, t): one 3x3 convolution plus a time-dependent offset."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return 0.3 * self.conv(x) + 0.2 * torch.sin(t.float() / 100).reshape(-1, 1, 1, 1)


@pytest.mark.slow
def test_ddim_notebook_course_branch(tmp_path, monkeypatch):
    """The notebook's own cells, run in-process with a fake course folder and a tiny stand-in for UNet.pt:
    the MSE table, the chosen convention, the course folder and the figures."""
    import matplotlib

    matplotlib.use("Agg")
    from hw2lib import ddim, faces, samplers
    from hw2lib.schedule import NoiseSchedule

    monkeypatch.setenv("HW2_RUNS", str(tmp_path / "runs"))
    torch.manual_seed(0)
    model = ConvEps().eval()  # a cheap stand-in for the 113 M-parameter course UNet at 256x256
    face = tmp_path / "hw2_data" / "face"
    noises = faces.make_noises(3, 256, seed=11)
    for i, z in enumerate(noises):
        faces.save_noise(z, face / "noise" / f"{i:02d}.pt")
    with torch.no_grad():  # the "ground truth": the plus-one convention, so auto must pick it
        gt = ddim.to_uint8(samplers.ddim_sample(model, torch.cat(noises), NoiseSchedule.linear(), steps=50,
                                                convention="plus-one"))
    (face / "GT").mkdir()
    from PIL import Image

    for i, img in enumerate(gt):
        Image.fromarray(img).save(face / "GT" / f"{i:02d}.png")
    (face / "UNet.pt").write_bytes(b"stand-in")
    monkeypatch.setattr(ddim, "load_unet_file", lambda path, device: model)

    nb = nbformat.read(str(REPO / "notebooks" / "02_ddim.ipynb"), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in cells[0].metadata.get("tags", [])
    ns = {}
    exec(cells[0].source, ns)
    ns.update(profile="smoke", model="course", data_root=str(tmp_path / "hw2_data"), steps=2, device="cpu")
    for cell in cells[1:]:
        exec(cell.source, ns)
    run = tmp_path / "runs" / "smoke"
    table = json.loads((run / "tables" / "ddim_mse.json").read_text())
    assert [r["image"] for r in table["rows"]] == ["00.png", "01.png", "02.png", "mean"]
    assert table["rows"][-1]["plus-one"] == 0.0 and table["rows"][-1]["ermon"] > 0
    assert ns["convention"] == "plus-one" and table["best"] == "plus-one"
    assert sorted(p.name for p in (run / "ddim_faces").iterdir()) == ["00.png", "01.png", "02.png"]
    for name in ("ddim_eta", "ddim_interpolation", "ddim_course"):
        meta = json.loads((run / "figures" / f"{name}.json").read_text())
        assert "course" in meta["data_source"] and "course noises" in meta["noises"]
    assert not (run / "tables" / "ddim_setup.json").exists()
