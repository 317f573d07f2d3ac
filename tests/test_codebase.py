"""Rules of the codebase that keep it quick to change, checked so that they stay true."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "kernel.py", *sorted((ROOT / "utils").glob("*.py"))]
MAX_FUNCTION_LINES = 60  # one screen


def test_every_function_fits_on_one_screen():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "split these into named steps: " + ", ".join(long)


def test_files_are_replaced_in_one_place_only():
    # utils.atomic.atomic_write: unique temporary name, fsync, os.replace. A second copy
    # would drift (the project once had seven, with three naming schemes).
    calls = [f"{path.name}:{node.lineno}" for path in SOURCES
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.replace", "os.rename",
                                                                          "shutil.move")]
    assert calls == [f"atomic.py:{_line_of(ROOT / 'utils' / 'atomic.py', 'os.replace(')}"]


def test_every_module_says_what_it_is_for():
    for path in SOURCES:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if path.name != "__init__.py":
            assert doc and len(doc.splitlines()[0]) > 20, path.name


def test_the_readmes_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [p.name for p in SOURCES if p.name != "__init__.py"
               and f"{p.relative_to(ROOT).as_posix()} " not in layout.replace("\n", " \n")]
    assert missing == [], f"add these to the README's Layout: {missing}"


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)
