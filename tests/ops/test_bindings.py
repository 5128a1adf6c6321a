"""resalign_fast/_C.pyi describes the built extension: every function it exports, with the argument
names the bindings give (pybind11 writes them into each function's signature line)."""

import ast
import re
from pathlib import Path

import pytest

STUB = Path(__file__).resolve().parents[2] / "resalign_fast" / "_C.pyi"


def _stub() -> dict[str, list[str]]:
    """Function name -> argument names; `a = b` aliases share b's signature."""
    tree = ast.parse(STUB.read_text())
    functions = [f for f in tree.body if isinstance(f, ast.FunctionDef)]
    stub = {f.name: [a.arg for a in f.args.args] for f in functions}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            stub.update({target.id: stub[node.value.id] for target in node.targets})
    return stub


def test_stub_matches_the_built_extension():
    from resalign_fast.ops import registry

    ext, why = registry.extension()
    if ext is None:
        pytest.skip(why or "resalign_fast._C is not built")
    stub = _stub()
    built = sorted(n for n in dir(ext) if not n.startswith("_"))
    assert set(built) <= set(stub), set(built) - set(stub)
    assert all(n.endswith("_cuda") for n in set(stub) - set(built))  # only a CUDA build adds these
    for name in built:
        first = getattr(ext, name).__doc__.splitlines()[0]  # "name(a: T, b: T) -> R"
        names = re.findall(r"(\w+): ", first.split("(", 1)[1].rsplit(")", 1)[0])
        assert names == stub[name], (name, names, stub[name])
