"""The layering rules of the house, as import contracts (pyproject.toml [tool.importlinter], run by
`make lint`): they hold on the tree, and each one fails when a single forbidden import is added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from kit import ROOT

LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
# {contract id: its name}, as pyproject.toml declares them
CONTRACTS = {c["id"]: c["name"] for c in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if not Path(LINT_IMPORTS).exists():
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' (import-linter)")
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def verdicts(out: str) -> dict[str, str]:
    """{contract id: "KEPT" | "BROKEN" | "MISSING"} from lint-imports' report (which wraps long lines)."""
    flat = " ".join(out.split())
    return {cid: next((v for v in ("KEPT", "BROKEN") if f"{name} {v}" in flat), "MISSING")
            for cid, name in CONTRACTS.items()}


def test_the_tree_keeps_every_contract():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(CONTRACTS) == {"core", "algos", "services", "clients"}
    assert verdicts(r.stdout) == dict.fromkeys(CONTRACTS, "KEPT"), r.stdout


# one forbidden import per contract: (file under the chatrl tree, the line added to it)
VIOLATIONS = {
    "core": ("services/core/model.py", "import grpc"),
    "algos": ("services/trainer/rl.py", "import ray"),
    "services": ("services/policy/server.py", "from chatrl.services.reward import server as _reward_server"),
    "clients": ("clients/lib.py", "from chatrl.services.core import model as _model"),
}


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """A copy of the source as a plain `chatrl` package directory (services/ → chatrl/services, clients/ →
    chatrl/clients) with the project's pyproject.toml, for lint-imports to analyse instead of the tree."""
    d = tmp_path_factory.mktemp("layering")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("services", "clients"):
        shutil.copytree(ROOT / folder, d / "chatrl" / folder, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", d / "pyproject.toml")
    return d


@pytest.mark.parametrize("contract", list(VIOLATIONS))
def test_a_forbidden_import_breaks_its_contract(tree_copy, contract, tmp_path):
    work = tmp_path / "tree"
    shutil.copytree(tree_copy, work)
    rel, line = VIOLATIONS[contract]
    target = work / "chatrl" / rel
    target.write_text(target.read_text() + f"\n{line}  # the deliberate violation\n")
    # the copy, not the editable install, is what `chatrl.services` / `chatrl.clients` resolve to
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(work), "PYTHONNOUSERSITE": "1"}
    r = lint_imports(work, env=env)
    assert r.returncode != 0, r.stdout + r.stderr
    got = verdicts(r.stdout)
    # the stages import core, so grpc in core reaches them too: that contract breaks with it
    broken = {"core": {"core", "algos"}}.get(contract, {contract})
    assert {c for c, v in got.items() if v == "BROKEN"} == broken, r.stdout
    assert all(v == "KEPT" for c, v in got.items() if c not in broken), r.stdout
    module = "chatrl." + rel.removesuffix(".py").replace("/", ".")
    assert module in r.stdout, r.stdout  # the report names the offending module
