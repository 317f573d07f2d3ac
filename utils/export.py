"""Kaggle export: kernel.py and the utils package as one notebook and one script.

A Kaggle notebook runs with internet off and cannot import a local package, so the
export inlines every ``utils`` module. Each one is executed as a real module
(``sys.modules["utils.x"]``) from its verbatim source rather than pasted into one
namespace: private helpers of different modules share names (``_write_csv`` in demo.py
and submission.py, ``_number`` in dicom.py and report.py) and would silently replace each
other. kernel.py's stages become cells at its ``# %% Title`` markers. Everything is
generated from the source files, so the export cannot drift from them; tests run both
outputs against kernel.py.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from utils.atomic import atomic_write
from utils.envcheck import WHEELS_MARKER, read_pins
from utils.errors import OutputError, UserError

LOG = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
COMPETITION = "rsna-intracranial-hemorrhage-detection"
STAGE_MARKER = "# %% "  # starts a stage of kernel.py: one notebook cell under its title
FIRST_MODULE = "envcheck"  # stdlib only: it checks the packages before any module imports one
CHECK_CALL = "from utils.envcheck import check_environment\n\ncheck_environment()\n"
KAGGLE_PYTHON = "3.11"  # the Python of Kaggle's image, for the wheels dataset
# the wheels dataset holds every pin of requirements.txt but these: Kaggle's own GPU builds
# of torch must stay (and are gigabytes)
NOT_IN_WHEELS = ("torch", "torchvision")
_INSTALLER = '''import sys
import types


def _module(name: str, source: str) -> None:
    """Run ``source`` as the module ``name`` (the exported notebook has no utils/ folder)."""
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    else:
        module.__path__ = []  # a package, so that "utils.x" imports resolve
    exec(compile(source, module.__file__, "exec"), module.__dict__)
'''


def _imported_utils(source: str, top_level_only: bool = False) -> set[str]:
    """The utils modules ``source`` imports (at module level alone, with top_level_only)."""
    nodes = ast.parse(source).body if top_level_only else ast.walk(ast.parse(source))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "utils":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("utils.")}
    return found


def _utils_modules(root: Path) -> list[str]:
    """The utils modules kernel.py imports at module level and those they import, each after
    the ones it imports: the competition pipeline. The tools main() imports when chosen
    (--predict DIR's own_scans, the export itself) stay in the repository."""
    sources = {p.stem: p.read_text() for p in sorted((root / "utils").glob("*.py")) if p.stem != "__init__"}
    deps = {name: sorted(_imported_utils(source) & set(sources)) for name, source in sources.items()}
    needed, todo = set(), [FIRST_MODULE, *_imported_utils((root / "kernel.py").read_text(), top_level_only=True)]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += deps[name]
    deps = {name: deps[name] for name in sorted(needed)}
    order, state = [], {}

    def visit(name: str) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"utils modules import each other in a cycle through {name}")
        state[name] = "visiting"
        for dep in deps[name]:
            visit(dep)
        state[name] = "done"
        order.append(name)
    for name in deps:
        visit(name)
    order.remove(FIRST_MODULE)
    return [FIRST_MODULE, *order]


def _module_call(name: str, source: str) -> str:
    if "'''" in source:
        raise ValueError(f"utils/{name}.py contains ''' and cannot be inlined in a raw string")
    return f"_module(\"utils.{name}\", r'''{source}''')\n"


def _kernel_parts(root: Path) -> tuple[str, list[tuple[str, str]], str]:
    """kernel.py as (docstring, [(stage title, code)], the __main__ block).

    Stages are marked in kernel.py by ``# %% Title`` lines (the percent cell format that
    Jupytext and VS Code read too); what precedes the first marker is the imports cell.
    """
    source = (root / "kernel.py").read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree) or ""
    guard = tree.body[-1]
    if not (isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"):
        raise ValueError("kernel.py must end with its `if __name__ == \"__main__\":` block")
    lines = source.splitlines(keepends=True)
    start = tree.body[0].end_lineno if doc else 0
    body = [line for line in lines[start:guard.lineno - 1]
            if line != "from __future__ import annotations\n"]
    sections, title, code = [], "Imports", []
    for line in body:
        if line.startswith(STAGE_MARKER):
            sections.append((title, "".join(code)))
            title, code = line[len(STAGE_MARKER):].strip(), []
        else:
            code.append(line)
    sections.append((title, "".join(code)))
    parts = [(title, code.strip("\n") + "\n") for title, code in sections if code.strip()]
    return doc, parts, "".join(lines[guard.lineno - 1:])


def build_bundle(root: Path = ROOT) -> str:
    """One self-contained script: run it like kernel.py, with no utils/ beside it."""
    doc, sections, main_block = _kernel_parts(root)
    parts = [f'"""{doc}\n\nGenerated by `python kernel.py --export-kaggle` from kernel.py and utils/; '
             f'do not edit."""\nfrom __future__ import annotations\n\n', _INSTALLER, "\n\n",
             _module_call("__init__", (root / "utils" / "__init__.py").read_text()).replace(
                 '"utils.__init__"', '"utils"')]
    for name in _utils_modules(root):
        parts.append(_module_call(name, (root / "utils" / f"{name}.py").read_text()))
        if name == FIRST_MODULE:
            parts.append(CHECK_CALL)
    for title, code in sections:
        parts.append(f"\n\n{STAGE_MARKER}{title}\n\n{code}")
    parts.append("\n\n" + main_block)
    return "".join(parts)


def _cell(kind: str, text: str, index: int) -> dict:
    cell = {"cell_type": kind, "id": f"cell-{index:03d}", "metadata": {},
            "source": text.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


NOTEBOOK_RUN_CELL = '''# Command-line options for this run, as you would type them after `python kernel.py`;
# on Kaggle the competition data under /kaggle/input is found by itself.
import os
import shlex

ARGS = shlex.split(os.environ.get("KERNEL_ARGS", ""))
exit_code = cli(ARGS)
assert exit_code == 0, f"the pipeline stopped with exit code {exit_code}"
'''


def build_notebook(root: Path = ROOT) -> dict:
    """An nbformat-4 notebook: the utils modules, then the pipeline a stage per cell."""
    doc, sections, _ = _kernel_parts(root)
    package = _module_call("__init__", (root / "utils" / "__init__.py").read_text()).replace(
        '"utils.__init__"', '"utils"')
    modules = _utils_modules(root)
    check = _module_call(FIRST_MODULE, (root / "utils" / f"{FIRST_MODULE}.py").read_text())
    texts = [("markdown", "# " + doc),
             ("markdown", "## Environment\nThe versions found, checked against the oldest the "
                          "pipeline supports; what is missing is installed from an attached "
                          "wheels dataset, or the run stops here saying what to attach."),
             ("code", f"{_INSTALLER}\n\n{package}{check}\n{CHECK_CALL}"),
             ("markdown", "## Helpers\nThe `utils` package, inlined: each cell runs one module "
                          "from its source, as `import utils.<name>` would.")]
    for name in modules[1:]:
        source = (root / "utils" / f"{name}.py").read_text()
        first = ast.get_docstring(ast.parse(source)) or ""
        texts.append(("markdown", f"### `utils/{name}.py`\n{first.splitlines()[0] if first else ''}"))
        texts.append(("code", _module_call(name, source)))
    for title, code in sections:
        texts.append(("markdown", f"## {title}"))
        texts.append(("code", code))
    texts.append(("markdown", "## Run"))
    texts.append(("code", NOTEBOOK_RUN_CELL))
    cells = [_cell(kind, text, i) for i, (kind, text) in enumerate(texts)]
    return {"cells": cells, "metadata": {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "version": "3.11"}},
        "nbformat": 4, "nbformat_minor": 5}


_KAGGLE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*/[a-z0-9][a-z0-9-]{2,49}$")


def kernel_metadata(kaggle_id: str, datasets: list[str]) -> dict:
    """kernel-metadata.json for `kaggle kernels push`; `datasets` are attached to it."""
    for ref, what in [(kaggle_id, "--kaggle-id")] + [(ref, "--kaggle-weights-dataset") for ref in datasets]:
        if not _KAGGLE_REF.match(ref):
            raise ValueError(f"{what} must look like user/slug (lowercase slug, 3-50 characters "
                             f"of a-z, 0-9 and -), got {ref!r}")
    slug = kaggle_id.split("/", 1)[1]
    return {"id": kaggle_id, "title": slug.replace("-", " ").capitalize(),
            "code_file": "kernel.ipynb", "language": "python", "kernel_type": "notebook",
            "is_private": True, "enable_gpu": True,
            "enable_internet": False,  # Kaggle's default is on; submissions need it off
            "dataset_sources": list(datasets),
            "competition_sources": [COMPETITION], "kernel_sources": []}


def wheel_pins(root: Path = ROOT) -> list[str]:
    """The `name==version` lines of requirements.txt that go into the wheels dataset."""
    return [line for name, line in read_pins(root / "requirements.txt").items() if name not in NOT_IN_WHEELS]


def download_wheels(folder: Path, dataset_id: str, root: Path = ROOT) -> list[Path]:
    """The wheels dataset: every pin of requirements.txt (torch aside) for Kaggle's Python
    on Linux x86-64, the list of them (the notebook finds the dataset by it) and
    dataset-metadata.json for `kaggle datasets create -p FOLDER`."""
    pins = wheel_pins(root)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", KAGGLE_PYTHON, "--implementation", "cp",
               "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "-d", str(folder), *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"pip download failed:\n{done.stderr.strip()[-3000:]}")
    marker = "".join(f"{pin}\n" for pin in pins)
    metadata = {"title": "RSNA hemorrhage pipeline wheels", "id": dataset_id,
                "licenses": [{"name": "other"}]}
    atomic_write(folder / WHEELS_MARKER, lambda tmp: tmp.write_text(marker))
    atomic_write(folder / "dataset-metadata.json",
                 lambda tmp: tmp.write_text(json.dumps(metadata, indent=2) + "\n"))
    return sorted(folder.glob("*.whl")) + [folder / WHEELS_MARKER, folder / "dataset-metadata.json"]


def export_kaggle(out_dir, kaggle_id: str, weights_dataset: str | None = None,
                  with_wheels: bool = False, root: Path = ROOT) -> list[Path]:
    """Write kernel.ipynb, kernel_bundle.py and kernel-metadata.json into ``out_dir``, and
    with ``with_wheels`` the wheels dataset into ``out_dir/wheels``, attached to the kernel."""
    out_dir = Path(out_dir)
    wheels_id = f"{kaggle_id.split('/', 1)[0]}/rsna-hemorrhage-wheels"
    datasets = [d for d in (weights_dataset, wheels_id if with_wheels else None) if d]
    metadata = kernel_metadata(kaggle_id, datasets)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = download_wheels(out_dir / "wheels", wheels_id, root) if with_wheels else []
    files = {"kernel.ipynb": json.dumps(build_notebook(root), indent=1) + "\n",
             "kernel_bundle.py": build_bundle(root),
             "kernel-metadata.json": json.dumps(metadata, indent=2) + "\n"}
    for name, text in files.items():
        atomic_write(out_dir / name, lambda tmp, text=text: tmp.write_text(text))
    return [out_dir / name for name in files] + written


def export_command(out_dir: str, kaggle_id: str | None, weights_dataset: str | None, with_wheels: bool) -> int:
    """--export-kaggle DIR: export_kaggle with what it wrote and how to push it logged."""
    if kaggle_id is None:
        kaggle_id = "your-kaggle-username/rsna-hemorrhage-pipeline"
        LOG.info(f"No --kaggle-id given: kernel-metadata.json says {kaggle_id}; edit it before pushing")
    out = Path(out_dir)
    try:
        files = export_kaggle(out, kaggle_id, weights_dataset, with_wheels)
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise OutputError(f"--with-wheels: {err}") from err
    for path in files:
        if path.suffix != ".whl":
            LOG.info(f"wrote {path}")
    if with_wheels:
        wheels = sorted((out / "wheels").glob("*.whl"))
        size = sum(p.stat().st_size for p in wheels) / 2**20
        LOG.info(f"{len(wheels)} wheels ({size:.0f} MiB) in {out / 'wheels'}: upload them first with "
                 f"kaggle datasets create -p {out / 'wheels'}")
    LOG.info(f"Push it with: kaggle kernels push -p {out}")
    return 0
