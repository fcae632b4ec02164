"""The eta and alpha sliders of ``02_ddim`` work in a real browser.

A fresh JupyterLab (127.0.0.1, a token, config / runtime / data / workspace folders under the
test's tmp dir, ``HW2_RUNS`` / ``HW2_CHECKPOINTS`` / ``HW2_DATA`` there too) serves a parameterised
copy of ``notebooks/02_ddim.ipynb`` (``profile="smoke"``, ``interactive=True``; papermill's
parameter injection, not executed).  Debian's Chromium, driven by Playwright, opens it, waits for
the kernel to be idle, runs all cells, then moves the eta and the alpha slider with the keyboard and
by dragging; after each move the readout, the status line (which the kernel writes when it has
redrawn) and the displayed image must change.  Full-page screenshots go to ``$E2E_ARTIFACTS``
(default ``runs/e2e/``).  The browser may reach nothing but the server: every other request is
aborted, and the test asserts there were none.

Set-up: ``make test`` installs Debian's ``chromium`` (as root) and Playwright comes with the dev
extra; never ``playwright install``.  Without ``/usr/bin/chromium`` or Playwright the test skips.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "02_ddim.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
# Chromium as root in a container, and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
SERVER_START_S = 120  # a fresh JupyterLab on 2 busy cores
RUN_ALL_MS = 300_000  # run all cells: the smoke profile trains 6 steps, then draws tiny figures
UI_MS = 60_000  # one slider redraw round trip, generous for a loaded machine
OPEN_MS = 300_000  # page load, then the kernel: JupyterLab's plugins take ~30 s to activate on 2 busy cores

# The smoke profile, interactive.  widget_steps: the smoke default (2 DDIM steps) injects noise only on a
# step whose sigma is ~0.01 * eta, so eta would change the image by a fraction of a grey level; with 10
# steps a slider move changes it visibly (still ~0.05 s a redraw for the tiny smoke model).
PARAMETERS = {"profile": "smoke", "interactive": True, "device": "cpu", "widget_steps": 10}
MIN_CHANGE = 2.0  # mean absolute change (0-255) of the displayed image that counts as "it changed"

pytestmark = pytest.mark.e2e


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy


def _api(base: str, token: str, path: str):
    req = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"token {token}"})
    with _DIRECT.open(req, timeout=10) as resp:
        return json.loads(resp.read().decode())


def _change(before: bytes, after: bytes) -> float:
    """Mean absolute difference (0-255) of two screenshots of the same element; inf if their sizes differ."""
    import io

    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.float32) for x in (before, after))
    return float(np.abs(a - b).mean()) if a.shape == b.shape else float("inf")


def _parameterised_copy(dest: Path) -> Path:
    """``02_ddim.ipynb`` with papermill's injected-parameters cell (smoke, interactive), not executed."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(NOTEBOOK))  # nbformat.read plus the metadata papermill expects
    nb = parameterize_notebook(nb, PARAMETERS)
    for cell in nb.cells:  # a clean notebook: nothing from an earlier run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    out = dest / NOTEBOOK.name
    nbformat.write(nb, str(out))
    return out


class LabServer:
    """``jupyter lab`` in its own process group with everything it writes under ``tmp``."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "root"
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "HW2_"))}
        venv_bin = str(Path(sys.executable).parent)
        dirs = {
            "JUPYTER_CONFIG_DIR": "jupyter_config", "JUPYTER_RUNTIME_DIR": "jupyter_runtime",
            "JUPYTER_DATA_DIR": "jupyter_data", "JUPYTERLAB_WORKSPACES_DIR": "lab_workspaces",
            "JUPYTERLAB_SETTINGS_DIR": "lab_settings", "IPYTHONDIR": "ipython",
            "HW2_RUNS": "hw2_runs", "HW2_CHECKPOINTS": "hw2_checkpoints", "HW2_DATA": "hw2_data",
        }
        for name, sub in dirs.items():
            (self.tmp / sub).mkdir(parents=True, exist_ok=True)
            env[name] = str(self.tmp / sub)
        env.update(PATH=venv_bin + os.pathsep + env.get("PATH", ""), JUPYTER_PLATFORM_DIRS="1",
                   PYTHONUNBUFFERED="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
        return env

    def write_config(self, env: dict[str, str]) -> None:
        config = Path(env["JUPYTER_CONFIG_DIR"])
        # JupyterLab's news pop-up would cover the page (and ask the internet for news)
        (config / "labconfig").mkdir(parents=True, exist_ok=True)
        (config / "labconfig" / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        (config / "jupyter_lab_config.json").write_text(json.dumps(
            {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}))

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = self.env()
        self.write_config(env)
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
               f"--LabApp.workspaces_dir={env['JUPYTERLAB_WORKSPACES_DIR']}",
               "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
               "--MappingKernelManager.default_kernel_name=python3"]
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log()}")
            try:
                _api(self.base, self.token, "/api/status")
                return
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_S} s:\n{self.log()}")

    def kernels(self) -> list[dict]:
        return _api(self.base, self.token, "/api/kernels")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it lingers; then its kernels if any are left.

        The server shuts its kernels down on SIGTERM; jupyter_client starts each kernel in a session of its
        own, so kernels still alive after that are found as the server's children and killed by their group.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        kernels = _children(self.proc.pid)
        pgid = os.getpgid(self.proc.pid)
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in kernels:  # only a kernel still running on a connection file of ours, leading its own group
            try:
                ours = str(self.tmp) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if ours and os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the server's kernels), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def playwright_api():
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian's Chromium not found at {CHROMIUM} (`make test` installs it as root: apt-get install "
                    "chromium); the browser test cannot run")
    return pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")


@pytest.fixture
def artifacts() -> Path:
    folder = Path(os.environ.get("E2E_ARTIFACTS") or REPO / "runs" / "e2e").expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.png"), folder / "jupyterlab.log"]:
        old.unlink(missing_ok=True)
    return folder


@pytest.fixture
def lab(tmp_path, playwright_api):
    server = LabServer(tmp_path)
    server.root.mkdir(parents=True)
    _parameterised_copy(server.root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- the page
class Page:
    """The notebook page and the screenshots taken of it."""

    def __init__(self, page, expect, artifacts: Path):
        self.page, self.expect, self.artifacts = page, expect, artifacts
        self.shots: list[Path] = []

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{len(self.shots) + 1:02d}_{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path

    def wait_kernel_idle(self, lab: LabServer, timeout_ms: int = RUN_ALL_MS) -> None:
        """Until the page shows a kernel that is idle and the server agrees (its one kernel idle, connected)."""
        panel = self.page.locator(".jp-NotebookPanel")
        indicator, name = panel.locator(".jp-Notebook-ExecutionIndicator"), panel.locator(".jp-KernelName")
        deadline = time.monotonic() + timeout_ms / 1000
        seen = None
        while time.monotonic() < deadline:
            kernels = lab.kernels()
            ui = (name.first.inner_text().strip() if name.count() else "", indicator.first.get_attribute("data-status")
                  if indicator.count() else None)
            seen = (ui, [(k["execution_state"], k["connections"]) for k in kernels])
            if (len(kernels) == 1 and kernels[0]["execution_state"] == "idle" and kernels[0]["connections"] >= 1
                    and ui[0] and "No Kernel" not in ui[0] and ui[1] == "idle"):
                return
            time.sleep(0.5)
        raise AssertionError(f"no idle kernel after {timeout_ms / 1000:.0f} s: (kernel name, indicator), "
                             f"(state, connections): {seen}")

    def run_all(self) -> None:
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    def wait_run_all_done(self, lab: LabServer) -> None:
        """Until the last cell printed "notebook took"; a traceback anywhere fails at once."""
        outputs = self.page.locator(".jp-NotebookPanel .jp-OutputArea-output")
        deadline = time.monotonic() + RUN_ALL_MS / 1000
        while time.monotonic() < deadline:
            text = "\n".join(outputs.all_inner_texts())
            if "Traceback (most recent call last)" in text or re.search(r"^\w+Error\b", text, re.M):
                self.shot("error")
                raise AssertionError(f"a cell failed:\n{text[-4000:]}\n--- server log ---\n{lab.log()}")
            if re.search(r"notebook took \d+ s", text):
                self.wait_kernel_idle(lab)
                return
            time.sleep(1)
        self.shot("timeout")
        raise AssertionError(f"run all did not finish within {RUN_ALL_MS / 1000:.0f} s")


class Explorer:
    """One explorer VBox in the page: its slider (found by its description), readout, image, status."""

    def __init__(self, page: Page, name: str):
        self.p, self.name = page, name
        pw = page.page
        label = pw.locator(".widget-label", has_text=re.compile(rf"^\s*{name}\s*$"))
        self.slider = pw.locator(".widget-hslider").filter(has=label)
        self.box = pw.locator(".widget-vbox").filter(has=self.slider)
        self.handle = self.slider.locator(".noUi-handle")
        self.track = self.slider.locator(".noUi-target")
        self.readout = self.slider.locator(".widget-readout")
        self.image = self.box.locator("img.widget-image")
        self.status = self.box.locator(".widget-html", has_text=f"{name} =")
        self.changes: list[tuple[str, str, float]] = []  # (readout before, after, mean image change)

    def check_found(self) -> None:
        e = self.p.expect
        e(self.slider).to_have_count(1, timeout=UI_MS)
        e(self.image).to_have_count(1, timeout=UI_MS)
        e(self.status).to_have_count(1, timeout=UI_MS)
        self.box.scroll_into_view_if_needed(timeout=UI_MS)
        self.wait_image_loaded()

    def wait_image_loaded(self) -> None:
        self.p.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=self.image.element_handle(),
                                      timeout=UI_MS)

    def value(self) -> float:
        return float(self.readout.inner_text().strip())

    def state(self) -> tuple[str, str, bytes]:
        """(readout, image src, the image as displayed)."""
        self.wait_image_loaded()
        return self.readout.inner_text().strip(), self.image.get_attribute("src") or "", self.image.screenshot()

    def wait_redrawn(self, before: tuple[str, str, bytes]) -> tuple[str, str, bytes]:
        """Until the readout moved, the kernel reported the new value, and the displayed image changed."""
        e = self.p.expect
        e(self.readout).not_to_have_text(before[0], timeout=UI_MS)
        value = self.value()
        e(self.status).to_contain_text(f"{self.name} = {value:g}:", timeout=UI_MS)
        deadline = time.monotonic() + UI_MS / 1000
        while True:
            after = self.state()
            change = _change(before[2], after[2])
            if change >= MIN_CHANGE:
                assert after[1] != before[1], "the displayed image changed but not its source"
                self.changes.append((before[0], after[0], change))
                return after
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: readout {before[0]} -> {after[0]} but the displayed image changed "
                                     f"by only {change:.2f} grey levels on average (< {MIN_CHANGE})")
            time.sleep(0.25)

    def press(self, key: str, times: int) -> None:
        self.handle.focus()
        for _ in range(times):
            self.handle.press(key)

    def drag_to(self, fraction: float) -> None:
        self.box.scroll_into_view_if_needed()
        h, t = self.handle.bounding_box(), self.track.bounding_box()
        assert h and t, "slider handle or track not laid out"
        x0, y = h["x"] + h["width"] / 2, h["y"] + h["height"] / 2
        x1 = t["x"] + fraction * t["width"]
        mouse = self.p.page.mouse
        mouse.move(x0, y)
        mouse.down()
        mouse.move(x1, y, steps=12)
        mouse.up()


# --------------------------------------------------------------------------- the test
def test_eta_and_alpha_sliders_in_jupyterlab(lab: LabServer, playwright_api, artifacts: Path):
    sync_playwright, expect = playwright_api.sync_playwright, playwright_api.expect
    started = time.perf_counter()
    requests, blocked, sockets = [], [], []

    def only_local(route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or (parts.hostname == "127.0.0.1" and parts.port == lab.port):
            route.continue_()
        else:
            blocked.append(url)
            route.abort("blockedbyclient")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1100}, service_workers="block")
            context.set_default_timeout(UI_MS)  # clicks and screenshots too: the machine may be busy
            context.route("**/*", only_local)
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            page.on("websocket", lambda ws: sockets.append(ws.url))
            ui = Page(page, expect, artifacts)
            try:
                page.goto(f"{lab.base}/lab/tree/{NOTEBOOK.name}?token={lab.token}", timeout=OPEN_MS)
                expect(page.locator(".jp-NotebookPanel")).to_be_visible(timeout=OPEN_MS)
                ui.wait_kernel_idle(lab, OPEN_MS)
                ui.shot("opened")
                phases = {"open, kernel idle": time.perf_counter() - started}
                ui.run_all()
                ui.wait_run_all_done(lab)
                ui.shot("ran_all")
                phases["run all"] = time.perf_counter() - started - sum(phases.values())

                moves = {"eta": ("ArrowRight", 4, 0.8), "alpha": ("ArrowLeft", 4, 0.9)}
                for name, (key, times, fraction) in moves.items():
                    ex = Explorer(ui, name)
                    ex.check_found()
                    state = ex.state()
                    start_value = ex.value()
                    ui.shot(f"{name}_before")

                    ex.press(key, times)
                    state = ex.wait_redrawn(state)
                    step = 0.05 * times * (1 if key == "ArrowRight" else -1)
                    assert ex.value() == pytest.approx(start_value + step, abs=1e-6), (name, state[0])
                    ui.shot(f"{name}_keyboard")

                    ex.drag_to(fraction)
                    state = ex.wait_redrawn(state)
                    assert ex.value() == pytest.approx(fraction, abs=0.1), (name, state[0])
                    ui.shot(f"{name}_drag")
                    print(f"{name}: " + "; ".join(f"{a} -> {b}: image changed by {c:.1f} grey levels"
                                                  for a, b, c in ex.changes))
            except Exception:
                try:
                    ui.shot("failure")
                except Exception:  # the original error matters more
                    pass
                (artifacts / "jupyterlab.log").write_text(lab.log())
                raise
            context.close()
        finally:
            browser.close()

    assert requests, "the browser made no requests at all"
    assert not blocked, f"the browser tried to reach beyond 127.0.0.1: {sorted(set(blocked))}"
    others = [u for u in requests + sockets if urlsplit(u).scheme not in ("data", "blob")
              and urlsplit(u).hostname != "127.0.0.1"]
    assert not others, others
    assert any(urlsplit(u).path.endswith("/channels") for u in sockets), f"no kernel websocket: {sockets}"
    assert len(ui.shots) == 8 and all(p.stat().st_size > 10_000 for p in ui.shots)
    phases["sliders"] = time.perf_counter() - started - sum(phases.values())
    print("e2e: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + f"; {len(requests)} requests and "
          f"{len(sockets)} websockets, all to 127.0.0.1:{lab.port}; screenshots in {artifacts}")
