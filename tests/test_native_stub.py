"""``moeray/native/_core.pyi`` stays in step with the compiled ``_core`` and with ``_reference``.

The stub is parsed with ``ast``. Its names (module functions, constants, classes and each
class's public methods; the private kernels ``_PredictKernel``, ``_stack_histogram`` and the
placement's included) must equal what ``_core`` exposes and what ``_reference`` exposes, and
every stubbed signature (parameter names, in order, and default values) must match the
reference's ``inspect.signature`` and the signature pybind11 records in each docstring.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import moeray.native
from moeray.native import _reference

pytestmark = pytest.mark.pure

STUB_PATH = Path(moeray.native.__file__).with_name("_core.pyi")


def _params(fn: ast.FunctionDef) -> list[tuple[str, object]]:
    """(name, default) of each parameter; default is inspect.Parameter.empty when there is none."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + [
        ast.literal_eval(d) for d in a.defaults
    ]
    out = list(zip([p.arg for p in positional], defaults))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((p.arg, inspect.Parameter.empty if d is None else ast.literal_eval(d)))
    assert a.vararg is None and a.kwarg is None, f"{fn.name}: the stub takes no *args/**kwargs"
    return out


class Stub:
    def __init__(self, path: Path):
        tree = ast.parse(path.read_text(), filename=str(path))
        self.functions: dict[str, ast.FunctionDef] = {}
        self.constants: set[str] = set()
        self.classes: dict[str, dict[str, ast.FunctionDef]] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if not node.target.id.startswith("__"):  # dunders: module metadata
                    self.constants.add(node.target.id)
            elif isinstance(node, ast.Assign):
                self.constants.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = {
                    m.name: m for m in node.body if isinstance(m, ast.FunctionDef)
                }

    @property
    def names(self) -> set[str]:
        return set(self.functions) | self.constants | set(self.classes)

    @property
    def public_names(self) -> set[str]:
        return {n for n in self.names if not n.startswith("_")}

    @property
    def private_names(self) -> set[str]:
        return self.names - self.public_names

    def public_methods(self, cls: str) -> set[str]:
        return {m for m in self.classes[cls] if not m.startswith("_")}


@pytest.fixture(scope="module")
def stub() -> Stub:
    assert STUB_PATH.is_file(), STUB_PATH
    return Stub(STUB_PATH)


@pytest.fixture(scope="module")
def native():
    try:
        return importlib.import_module("moeray.native._core")
    except ImportError as exc:
        pytest.skip(f"moeray's native core is not built: {exc}")


def public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def module_names(module) -> set[str]:
    """A module's own names: public ones and private ones, not dunders."""
    return {n for n in dir(module) if not n.startswith("__")}


def reference_methods(cls) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def pybind_params(doc: str) -> list[tuple[str, object]]:
    """(name, default) of each parameter in the first line of a pybind11 docstring.

    ``access(self: moeray.native._core.ExpertCacheCore, expert_id: int) -> bool``
    """
    line = doc.strip().splitlines()[0]
    start = line.index("(")
    depth, parts, current = 0, [], ""
    for ch in line[start + 1 :]:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    out = []
    for part in parts:
        name = part.split(":")[0].split("=")[0].strip()
        default = inspect.Parameter.empty
        if " = " in part:
            default = ast.literal_eval(part.rsplit(" = ", 1)[1].strip())
        out.append((name, default))
    return out


# --------------------------------------------------------------------------- the stub itself


def test_stub_declares_the_documented_api(stub):
    """The names moeray.native promises: three classes, four functions, three policy codes."""
    assert stub.public_names == {
        "ExpertCacheCore",
        "AffinityCore",
        "PrefetcherCore",
        "schedule",
        "belady_hits",
        "expert_matvec",
        "dispatch",
        "LRU",
        "LFU",
        "ADAPTIVE",
    }
    assert stub.private_names == {  # the policies', the placement's and the session's kernels
        "_PredictKernel",
        "_DemandSession",
        "_HotPlan",
        "_LayerAffinities",
        "_stack_histogram",
        "_replicate",
        "_pack",
        "_improve",
        "_dispatch_allocation",
    }
    for cls in stub.classes.values():
        assert "__init__" in cls
        for name, fn in cls.items():
            assert fn.args.args and fn.args.args[0].arg == "self", name


# --------------------------------------------------------------------------- _reference


CLASSES = [
    "ExpertCacheCore",
    "AffinityCore",
    "PrefetcherCore",
    "_PredictKernel",
    "_DemandSession",
    "_HotPlan",
    "_LayerAffinities",
]


def test_reference_names_match_stub(stub):
    assert set(_reference.__all__) == stub.names
    for name in _reference.__all__:
        assert hasattr(_reference, name), name


def test_stub_classes_are_all_checked(stub):
    assert set(stub.classes) == set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES)
def test_reference_methods_match_stub(stub, cls):
    assert reference_methods(getattr(_reference, cls)) == stub.public_methods(cls)


def test_reference_signatures_match_stub(stub):
    checked = 0
    for cls_name, methods in stub.classes.items():
        cls = getattr(_reference, cls_name)
        for name, fn in methods.items():
            sig = inspect.signature(getattr(cls, name))
            actual = [(p.name, p.default) for p in sig.parameters.values()]
            assert actual == _params(fn), f"{cls_name}.{name}"
            checked += 1
    for name, fn in stub.functions.items():
        sig = inspect.signature(getattr(_reference, name))
        assert [(p.name, p.default) for p in sig.parameters.values()] == _params(fn), name
        checked += 1
    assert checked == sum(len(m) for m in stub.classes.values()) + len(stub.functions) >= 45


def test_reference_constants_are_distinct_ints(stub):
    values = [getattr(_reference, c) for c in sorted(stub.constants)]
    assert all(type(v) is int for v in values) and len(set(values)) == len(values)


# --------------------------------------------------------------------------- _core


def test_core_names_match_stub(stub, native):
    assert module_names(native) == stub.names


@pytest.mark.parametrize("cls", CLASSES)
def test_core_methods_match_stub(stub, native, cls):
    assert public(dir(getattr(native, cls))) == stub.public_methods(cls)


def test_core_signatures_match_stub(stub, native):
    """pybind11 records ``py::arg`` names and defaults in each docstring's first line."""
    for cls_name, methods in stub.classes.items():
        cls = getattr(native, cls_name)
        for name, fn in methods.items():
            params = pybind_params(getattr(cls, name).__doc__)
            assert params == _params(fn), f"{cls_name}.{name}"
    for name, fn in stub.functions.items():
        assert pybind_params(getattr(native, name).__doc__) == _params(fn), name


def test_core_constants_match_reference(stub, native):
    for name in stub.constants:
        value = getattr(native, name)
        assert type(value) is int and value == getattr(_reference, name), name


def test_pybind_params_parser():
    """The docstring parser used above, on the shapes pybind11 writes."""
    doc = (
        "access_batch(self: m.C, expert_ids: object, affinity: m.A = None, "
        "affinity_weight: typing.SupportsFloat | typing.SupportsIndex = 0.0) -> numpy.NDArray[numpy.bool]\n"
    )
    assert pybind_params(doc) == [
        ("self", inspect.Parameter.empty),
        ("expert_ids", inspect.Parameter.empty),
        ("affinity", None),
        ("affinity_weight", 0.0),
    ]
    assert pybind_params(
        "update(self: m.A, activated: collections.abc.Sequence[typing.SupportsInt | x]) -> None"
    ) == [
        ("self", inspect.Parameter.empty),
        ("activated", inspect.Parameter.empty),
    ]
    assert pybind_params("num_experts(self: m.A) -> int") == [("self", inspect.Parameter.empty)]


def test_native_core_carries_the_package_version():
    """One version: the build passes pyproject.toml's to the core; a stale build shows here."""
    import moeray

    core = pytest.importorskip("moeray.native._core")
    if moeray.__version__ == "0+unknown":
        pytest.skip("moeray is not installed: no version to compare")
    assert core.__version__ == moeray.__version__
