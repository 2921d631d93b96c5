"""A client-only install: chatrl.clients needs neither torch nor Ray, and the wheel claims no generic
top-level import names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# torch and ray made unimportable: a meta-path finder ahead of every other refuses them
BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "ray"):
                raise ImportError(f"{name} is blocked: a client-only install has no {name}")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def run_blocked(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_every_client_module_imports_without_torch_or_ray():
    r = run_blocked("""
        import importlib, pkgutil
        import chatrl.clients as pkg
        names = [m.name for m in pkgutil.walk_packages(pkg.__path__, "chatrl.clients.")]
        for n in names:
            importlib.import_module(n)
        assert "chatrl.clients.lib" in names and "chatrl.clients.cli" in names, names
        assert not any(m.split(".")[0] in ("torch", "ray") for m in sys.modules)
        print("imported", len(names))
    """)
    assert r.returncode == 0, r.stderr
    assert "imported" in r.stdout


def test_the_client_cli_parses_and_lists_every_command_without_torch_or_ray():
    r = run_blocked("""
        from chatrl.clients import cli
        args = cli.build_parser().parse_args(["generate", "hello", "-n", "2"])
        assert args.prompt == "hello" and args.n == 2
        try:
            cli.main(["--help"])
        except SystemExit as e:
            assert e.code == 0
    """)
    assert r.returncode == 0, r.stderr
    for cmd in ("status", "generate", "chat", "train", "demo", "pipeline", "serve", "up", "data", "sample"):
        assert f"    {cmd} " in r.stdout, r.stdout


def test_a_server_command_without_the_server_side_says_so():
    r = run_blocked("""
        from chatrl.clients import cli
        sys.exit(cli.main(["train", "sft"]))
    """)
    assert r.returncode == 2
    assert "chatrl train: this is a server-side command and this install has the client only" in r.stderr


def test_the_wheel_holds_only_the_chatrl_package(tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("services", "clients"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("chatrl-*.whl")
    top = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"chatrl"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "chatrl/clients/cli.py" in names and "chatrl/services/cli.py" in names
    assert "chatrl/services/proto/codecs.py" in names and "chatrl/services/proto/enums.py" in names
