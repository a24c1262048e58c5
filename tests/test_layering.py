"""The package layout is the architecture: no module imports from a layer above its own."""

import ast
import subprocess
import sys
from pathlib import Path

import refbnn

PACKAGE = Path(refbnn.__file__).parent

# lowest first; a module may import from its own rank or below
RANKS = {
    "refbnn.bits": 0,
    "refbnn.reference": 0,
    "refbnn.scale": 0,
    "refbnn.kernels": 1,  # pure compute: no validation, nothing from refbnn.ops
    "refbnn.ops": 2,
    "refbnn": 2,  # the package facade re-exports the public ops
    "refbnn.data": 2,
    "refbnn.plot": 2,
    "refbnn.cli_util": 2,
    "refbnn.atomicio": 2,
    "refbnn.nn": 3,
    "refbnn.models": 4,
    "refbnn.training": 5,
    "refbnn.engine": 6,  # Engine.from_file reads files (refbnn.fileformat)
    "refbnn.training.fit": 6,  # the loop that writes run files: training + the file format
    "refbnn.fileformat": 6,
    "refbnn.fileformat_v1": 6,
    "refbnn.interop": 6,
    "refbnn.interop.train_torch": 7,  # a command-line tool (uses refbnn.train's recipe defaults)
    "refbnn.predictor": 6,  # refbnn.load: file format + models + engine
    "refbnn.golden": 6,  # the golden-vector library
    "refbnn.golden.cli": 7,  # its command line (python -m refbnn.golden)
    "refbnn.golden.__main__": 7,
    "refbnn.budget": 7,
    "refbnn.train": 7,
    "refbnn.infer": 7,
    "refbnn.crosscheck": 7,
    "refbnn.experiments": 7,
    "refbnn.export": 7,
    "refbnn.convert": 7,
}


# imports a module may make from above its layer, only inside a function (imported on first use)
LAZY = {"refbnn": {"refbnn.predictor"}}  # refbnn.load


def rank_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in RANKS:
            return RANKS[key]
    raise AssertionError(f"module {module} has no layer in tests/test_layering.py: add it")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def refbnn_imports(path: Path, lazy=frozenset()):
    """Every refbnn module ``path`` imports, absolute (``import refbnn.x``, ``from refbnn.x import``)
    and relative (``from .x import``, ``from .. import bits``: each imported name that is a module
    counts, else its package), except those of ``lazy`` imported inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name.split(".")[0] == "refbnn"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found = [] if target.split(".")[0] != "refbnn" else \
                [f"{target}.{a.name}" if _exists(f"{target}.{a.name}") else target
                 for a in node.names]
        else:
            continue
        if id(node) in in_function and found and all(n in lazy for n in found):
            continue
        yield from found


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or \
        (PACKAGE.parent / rel / "__init__.py").is_file()


def test_every_listed_layer_exists():
    assert [m for m in RANKS if not _exists(m)] == []


def test_no_module_imports_upward():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        own = rank_of(name)
        for imported in refbnn_imports(path, LAZY.get(name, frozenset())):
            if rank_of(imported) > own:
                offences.append(f"{name} (layer {own}) imports {imported} (layer {rank_of(imported)})")
    assert not offences, "\n".join(offences)


def test_relative_imports_are_seen():
    """The kernels import each other relatively: the checker must resolve those (a test that
    could not fail otherwise)."""
    seen = set(refbnn_imports(PACKAGE / "kernels" / "bconv_fast.py"))
    assert {"refbnn.kernels.bconv_tiles", "refbnn.kernels.epilogue", "refbnn.kernels.simd"} <= seen
    assert "refbnn.bits" in set(refbnn_imports(PACKAGE / "ops" / "plan.py"))


def test_reference_oracle_shares_no_code():
    path = PACKAGE / "reference.py"
    assert list(refbnn_imports(path)) == []


def test_lazy_imports_stay_lazy():
    # `import refbnn` loads none of the modules its facade imports on first use
    code = ("import sys, refbnn; lazy = " + repr(sorted(set().union(*LAZY.values()))) +
            "; print([m for m in lazy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "refbnn.predictor" in LAZY["refbnn"] and callable(refbnn.load)


def _readme_layout_paths():
    """Every ``refbnn/...`` path the README's layout table names (``{a,b}.py`` expanded)."""
    import re

    text = (PACKAGE.parent / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = []
    for cell in re.findall(r"`(refbnn/[^`]*)`", section):
        m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", cell)
        paths += [m[1] + part + m[3] for part in m[2].split(",")] if m else [cell]
    return paths


def test_readme_layout_table_is_true():
    """The table names only files and folders that exist, and every top-level module or package
    of refbnn (the facade ``__init__`` aside) has a row."""
    paths = _readme_layout_paths()
    assert len(paths) > 20
    assert [p for p in paths if not (PACKAGE.parent / p.rstrip("/")).exists()] == []
    top = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | \
        {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    named = {p.split("/")[1] + ("/" if p.count("/") > 1 else "") for p in paths}
    assert sorted(top - named) == []
