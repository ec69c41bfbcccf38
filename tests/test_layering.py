"""Layering: the policy layer, the native core, traces, replay and the CLI never import Ray.

Checked twice: dynamically, in a fresh interpreter (``sys.modules`` after the imports), and
statically, by reading every source file under ``moeray/policy`` and ``moeray/native``. A last
test checks that the ``pure`` marker of ``tests/conftest.py`` really fails a test that imports
a module named ``ray``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import moeray

pytestmark = pytest.mark.pure

PACKAGE = Path(moeray.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent

_PROBE = textwrap.dedent(
    """
    import sys
    import {modules}
    leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    print("LEAKED:" + ",".join(leaked))
    import moeray.native
    print("NATIVE:" + str(moeray.native.IS_NATIVE))
    """
)


def run_probe(modules: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", _PROBE.format(modules=modules)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tempfile.gettempdir(),  # not the checkout: `-c` puts the cwd first on sys.path
    )


@pytest.mark.parametrize("pure_python", ["0", "1"], ids=["native", "pure-python"])
@pytest.mark.parametrize(
    "modules",
    [
        "moeray, moeray.policy, moeray.replay, moeray.traces, moeray.placement, moeray.engine",
        "moeray.cli, moeray.native, moeray.native._reference, moeray.policy.memory",
    ],
)
def test_fresh_import_does_not_load_ray(modules, pure_python):
    proc = run_probe(modules, {"MOERAY_PURE_PYTHON": pure_python})
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    assert lines["LEAKED"] == "", f"importing {modules} loaded {lines['LEAKED']}"
    if pure_python == "1":
        assert lines["NATIVE"] == "False"  # the probe really ran on the reference core


def test_probe_detects_ray_when_it_is_imported(tmp_path):
    """The probe is able to fail: a stand-in module named ``ray`` imported alongside shows up."""
    (tmp_path / "ray.py").write_text("VALUE = 1\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = run_probe("moeray, ray", env)
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED:ray" in proc.stdout


def source_files(*parts: str) -> list[Path]:
    files = []
    for part in parts:
        root = PACKAGE.joinpath(*part.split("/"))
        files += sorted(p for p in root.rglob("*") if p.suffix in (".py", ".pyi"))
    return files


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(
            node.func, "attr", getattr(node.func, "id", "")
        ) in (
            "import_module",
            "__import__",
        ):
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add(arg.value.split(".")[0])
    return found


_RAY_TEXT = re.compile(r"^\s*(import\s+ray\b|from\s+ray(\.\w+)*\s+import\b)", re.MULTILINE)


def test_policy_and_native_sources_never_import_ray():
    files = source_files("policy", "native", "placement")
    names = {p.name for p in files}
    # The files this test must cover are really there.
    assert {
        "cache.py",
        "affinity.py",
        "scheduler.py",
        "belady.py",
        "matvec.py",  # native/_reference/
        "planner.py",  # placement/
        "__init__.py",
    } <= names
    for path in files:
        text = path.read_text()
        assert not _RAY_TEXT.search(text), f"{path} imports ray"
        assert "ray" not in imported_top_modules(path), f"{path} imports ray"


def test_import_detector_finds_ray_imports(tmp_path):
    """The static check above is able to fail."""
    samples = {
        "a.py": "import ray\n",
        "b.py": "from ray import serve\n",
        "c.py": "def f():\n    import ray.util as u\n",
        "d.py": "import importlib\nm = importlib.import_module('ray')\n",
        "e.py": "import os, ray\n",
    }
    for name, text in samples.items():
        path = tmp_path / name
        path.write_text(text)
        assert "ray" in imported_top_modules(path), name
    clean = tmp_path / "clean.py"
    clean.write_text(
        "import numpy as np\nfrom moeray.native import backend\narray = 'import ray'\n"
    )
    assert "ray" not in imported_top_modules(clean)
    assert _RAY_TEXT.search(samples["c.py"]) and not _RAY_TEXT.search("x = 'gray'\n")


def test_pure_marker_fails_a_test_that_imports_ray(tmp_path):
    """Runs a throwaway suite with this conftest and a stand-in ``ray`` module."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "ray.py").write_text("VALUE = 1\n")
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.pure
            def test_pure_imports_ray():
                import ray

            @pytest.mark.pure
            def test_pure_clean():
                pass

            def test_unmarked_imports_ray():
                import ray
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert re.search(r"ERROR .*test_pure_imports_ray", out), out
    assert "marked pure but imported ray" in out
    assert re.search(r"PASSED .*test_pure_clean", out), out
    assert not re.search(r"ERROR .*test_pure_clean", out), out
    assert not re.search(r"(ERROR|FAILED) .*test_unmarked_imports_ray", out), out
