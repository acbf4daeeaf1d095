"""The package's layering is checked, not assumed (issue 16 step 6).

The contracts live in ``pyproject.toml`` under ``[tool.importlinter]``:
cli > api > runtime | train | zoo > frontends | backends | passes > lowering > ir > config > errors,
frontends and backends independent, passes importing only ir (and lowering.he, the HE cost
arithmetic, which imports no HE library nor torch), nothing below cli importing cli and nothing
below api importing api, the CLI importing only api (and errors). ``lint-imports`` checks every import, including the ones inside
functions, and indirect chains.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ("layers", "frontends-backends", "passes-only-ir", "cli-on-top", "api-above-layers", "cli-only-api", "he-costs-pure")


def _contract_count() -> int:
    # other contracts (e.g. on external packages) may sit next to the layering ones
    return len(re.findall(r"^\[\[tool\.importlinter\.contracts\]\]", (ROOT / "pyproject.toml").read_text(), flags=re.M))


def _lint_imports() -> str:
    # The console script of the interpreter running the tests (the venv .ci/run makes).
    exe = Path(sys.executable).with_name("lint-imports.exe" if os.name == "nt" else "lint-imports")
    if not exe.is_file():
        pytest.fail(f"{exe} not found: install the dev extra (pip install -e '.[dev]', which brings import-linter)")
    return str(exe)


def _run(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_lint_imports(), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layering_contracts_are_kept():
    proc = _run(ROOT)
    out = proc.stdout + proc.stderr
    # On failure the report names each broken contract and its import chains (module:line).
    assert proc.returncode == 0, f"lint-imports found layering violations:\n{out}"
    assert f"Contracts: {_contract_count()} kept, 0 broken." in out, out
    for contract in CONTRACTS:
        assert re.search(rf'id = "{contract}"', (ROOT / "pyproject.toml").read_text()), contract


def _copy_with(tmp_path: Path, injected: dict[str, str]) -> Path:
    """A copy of the package's sources with one import appended to each named module."""
    dest = tmp_path / "graphpress"
    shutil.copytree(ROOT / "graphpress", dest, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    for rel, line in injected.items():
        path = dest / rel
        path.write_text(path.read_text() + f"\n\ndef _layering_probe():\n    {line}\n")
    return tmp_path


def test_contracts_catch_injected_violations(tmp_path):
    """Each contract breaks, naming the chain, when the import it forbids appears (in a function body)."""
    src = _copy_with(
        tmp_path,
        {
            "passes/base.py": "from graphpress.backends.base import Backend",
            "frontends/onnx.py": "import graphpress.backends.onnxruntime.session",
            "ir/graph.py": "from graphpress.api import compress",
            "runtime/bench.py": "import graphpress.cli.report",
            "cli/samples.py": "from graphpress.zoo.samples import KINDS",
            "passes/budget.py": "from graphpress.lowering.onnx import translation_table",
            "lowering/he/counts.py": "import torch",
        },
    )
    env = dict(os.environ, PYTHONPATH=str(src))  # the copy shadows the editable install
    proc = _run(src, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"Contracts: {_contract_count() - 7} kept, 7 broken." in out, out
    for importer, imported in [
        ("graphpress.passes.base", "graphpress.backends.base"),
        ("graphpress.frontends.onnx", "graphpress.backends.onnxruntime.session"),
        ("graphpress.ir.graph", "graphpress.api"),
        ("graphpress.runtime.bench", "graphpress.cli.report"),
        ("graphpress.cli.samples", "graphpress.zoo.samples"),
        ("graphpress.passes.budget", "graphpress.lowering.onnx"),
        ("graphpress.lowering.he.counts", "torch"),
    ]:
        assert re.search(rf"{re.escape(importer)} -> {re.escape(imported)} \(l\.\d+[,)]", out), (importer, imported, out)


def test_passes_may_import_only_the_he_part_of_lowering():
    """Every lowering subpackage but ``he`` is in passes-only-ir's forbidden modules, so a new
    one (a TVM or another target's lowering) is forbidden to passes from the start."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r'id = "passes-only-ir".*?forbidden_modules = \[(.*?)\]', text, flags=re.S)
    assert block, "passes-only-ir contract not found"
    forbidden = set(re.findall(r'"(graphpress\.[\w.]+)"', block.group(1)))
    subpackages = {p.name for p in (ROOT / "graphpress" / "lowering").iterdir() if (p / "__init__.py").is_file()}
    assert "he" in subpackages and "onnx" in subpackages, subpackages
    missing = {f"graphpress.lowering.{name}" for name in subpackages - {"he"}} - forbidden
    assert not missing, f"add to passes-only-ir's forbidden_modules in pyproject.toml: {sorted(missing)}"
    assert "graphpress.lowering" not in forbidden and "graphpress.lowering.he" not in forbidden


def test_ignored_imports_are_known_violations(tmp_path):
    """Each ignored import names the issue-16 step that removes it, and is a real violation:
    without the ignores the layers contract breaks on exactly those imports."""
    text = (ROOT / "pyproject.toml").read_text()
    entries = re.findall(r'^\s*# (.*)\n\s*"(graphpress\.[\w.]+) -> (graphpress\.[\w.]+)",', text, flags=re.M)
    listed = re.findall(r'^\s*"(graphpress\.[\w.]+ -> graphpress\.[\w.]+)",', text, flags=re.M)
    assert len(entries) == len(listed), f"every ignore_imports entry needs a comment line above it: {listed}"
    if not entries:
        return  # nothing ignored: the contracts test above covers everything
    for comment, importer, imported in entries:
        assert re.search(r"issue 16 step \d", comment), f"{importer} -> {imported}: comment names no issue-16 step"
    stripped = re.sub(r"^ignore_imports = \[.*?^\]\n", "", text, flags=re.M | re.S)
    assert "ignore_imports =" not in stripped
    config = tmp_path / "pyproject.toml"
    config.write_text(stripped)
    proc = subprocess.run(
        [_lint_imports(), "--no-cache", "--no-logo", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f"Contracts: {_contract_count() - 1} kept, 1 broken." in out, out
    assert "layers (cli on top, errors at the bottom) BROKEN" in out, out
    for _, importer, imported in entries:
        assert re.search(rf"{re.escape(importer)} -> {re.escape(imported)} \(l\.\d+[,)]", out), (importer, imported, out)
