import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env_lines = (REPO / "environment.yml").read_text().splitlines()
    pip_section = env_lines[env_lines.index("  - pip:") + 1:]
    listed = {_name(line.split("- ", 1)[1]) for line in pip_section if line.strip().startswith("- ")
              and not line.strip().startswith("- -e")}
    assert listed == wanted
    assert "  - python=3.11" in env_lines
    assert any(line.strip() == "- -e ." for line in pip_section)


def test_torch_ranges_admit_local_wheels():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(d for d in deps if _name(d) == "torch")
    vision = next(d for d in deps if _name(d) == "torchvision")
    from packaging.specifiers import SpecifierSet

    assert "2.14.1" in SpecifierSet(torch[len("torch"):])
    assert "0.29.1" in SpecifierSet(vision[len("torchvision"):])


def test_ci_calls_make_test_only():
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands and all(c in ("make test",) or c.startswith(("set ", "cd ")) for c in commands)
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make report" in readme
