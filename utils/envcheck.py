"""Is this Python able to run the pipeline? The Kaggle notebook's first cell.

Standard library only: it runs before anything else is imported, so that a missing or
too old package stops the run with one message saying what to attach, instead of an
ImportError in the middle of a stage. On Kaggle (internet off) the remedy is a dataset of
wheels made by ``python kernel.py --export-kaggle DIR --with-wheels``: when it is attached,
this installs what is missing from it with ``pip install --no-index --find-links``.
"""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

# The oldest versions supported. Those of requirements-oldest.txt are tested in CI (a test
# keeps the two equal); torch and torchvision are only stated: CI runs the pinned ones.
FLOORS = {
    "torch": "2.3.0",
    "torchvision": "0.18.0",
    "pydicom": "3.0.1",  # 3.0.0 downloads example files on import: minutes offline
    "numpy": "1.26.4",
    "pandas": "2.2.3",
    "pyarrow": "19.0.1",
    "albumentations": "2.0.0",
    "opencv-python-headless": "4.10.0.84",
    "tqdm": "4.67.1",
    "matplotlib": "3.7.5",
}
STATED_ONLY = ("torch", "torchvision")
# Without these the pipeline runs: compressed DICOM files, then NIfTI volumes, are skipped with
# that reason (utils/dicom.py, utils/nifti.py). Installed from attached wheels when missing.
OPTIONAL = {
    "python-gdcm": ("3.2.6", "compressed DICOM (JPEG, JPEG-LS, JPEG 2000) is skipped"),
    "nibabel": ("5.2.1", "NIfTI volumes are skipped"),
}
# cv2 comes from any of these; Kaggle's image has the full opencv-python
ALTERNATIVES = {"opencv-python-headless": ("opencv-python-headless", "opencv-python",
                                           "opencv-contrib-python", "opencv-contrib-python-headless")}
WHEELS_MARKER = "rsna-wheels.txt"  # in the wheels dataset: the requirements it holds
KAGGLE_INPUT = "/kaggle/input"


class EnvironmentProblem(RuntimeError):
    """A package is missing or older than its floor, and no wheels could fix it."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: '2.6.0+cu124' -> (2, 6, 0), '1.26.4' -> (1, 26, 4)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(x) for x in numbers.group(0).split(".")) if numbers else ()


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name` (or of one of its alternatives)."""
    for dist in ALTERNATIVES.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def find_problems(floors: dict[str, str] = FLOORS) -> dict[str, str]:
    """{package: what is wrong} for each package missing or below its floor."""
    problems = {}
    for name, floor in floors.items():
        found = installed_version(name)
        if found is None:
            problems[name] = f"not installed (need >= {floor})"
        elif release(found) < release(floor):
            problems[name] = f"{found} is older than {floor}"
    return problems


def find_wheels(root: str | Path = KAGGLE_INPUT) -> Path | None:
    """The folder of an attached wheels dataset (it holds WHEELS_MARKER), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    for marker in sorted(root.glob(f"*/{WHEELS_MARKER}")) + sorted(root.glob(f"*/*/{WHEELS_MARKER}")):
        return marker.parent
    return None


def read_pins(path: str | Path) -> dict[str, str]:
    """{package (lower case): 'package==version'} of a requirements file's pinned lines."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            pins[line.split("==", 1)[0].strip().lower()] = line
    return pins


def install_from_wheels(folder: Path, names) -> None:
    """pip install the pinned versions of `names` from `folder` only, never the internet."""
    pins = read_pins(folder / WHEELS_MARKER)
    wanted = [pins.get(name.lower(), name) for name in names]
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), *wanted]
    print("Installing from the attached wheels:", " ".join(wanted), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EnvironmentProblem(f"pip could not install {', '.join(wanted)} from {folder}:\n"
                                 f"{done.stderr.strip()[-2000:]}")


def _message(problems: dict[str, str]) -> str:
    listed = "\n".join(f"  - {name}: {why}" for name, why in problems.items())
    if set(problems) <= set(STATED_ONLY):  # gigabytes, built for the machine's CUDA: no wheels of ours
        return (f"This environment cannot run the pipeline:\n{listed}\n"
                "Choose a newer environment for the notebook (on Kaggle: Settings > Environment > "
                "Always use latest environment); elsewhere install torch for your CUDA from pytorch.org.")
    return (f"This environment cannot run the pipeline:\n{listed}\n"
            "Attach the wheels dataset made by `python kernel.py --export-kaggle DIR --with-wheels` "
            "(upload it with `kaggle datasets create -p DIR/wheels`) and run this cell again: its "
            "wheels are installed with `pip install --no-index --find-links <its folder>`. "
            "Elsewhere: `pip install -r requirements.txt`.")


def check_optional(optional: dict[str, tuple[str, str]] = OPTIONAL, wheels_root: str | Path = KAGGLE_INPUT) -> dict:
    """Install the optional packages missing or too old from attached wheels where it can;
    never stops a run: what is still missing is printed with what it costs.
    Returns {package: what is wrong} of those still missing."""
    problems = find_problems({name: floor for name, (floor, _) in optional.items()})
    folder = find_wheels(wheels_root) if problems else None
    if folder is not None:
        try:
            install_from_wheels(folder, list(problems))
        except EnvironmentProblem as err:
            print(f"Optional packages not installed: {err}", flush=True)
        importlib.invalidate_caches()
        problems = find_problems({name: optional[name][0] for name in problems})
    for name, why in problems.items():
        print(f"Optional: {name} {why}: {optional[name][1]}.", flush=True)
    return problems


def check_environment(floors: dict[str, str] = FLOORS, wheels_root: str | Path = KAGGLE_INPUT,
                      optional: dict[str, tuple[str, str]] = OPTIONAL) -> dict:
    """Print the versions found; install what is missing from attached wheels; else raise
    EnvironmentProblem with one message that says what to attach. The ``optional`` packages
    never stop it (check_optional). Returns the versions of ``floors``' packages."""
    versions = {name: installed_version(name) for name in floors}
    print("Python", sys.version.split()[0], "|", ", ".join(f"{n} {v or '-'}" for n, v in versions.items()))
    problems = find_problems(floors)
    check_optional(optional, wheels_root)
    if not problems:
        return versions
    folder = find_wheels(wheels_root)
    installable = [name for name in problems if name not in STATED_ONLY]
    if folder is None or not installable:
        raise EnvironmentProblem(_message(problems))
    install_from_wheels(folder, installable)
    importlib.invalidate_caches()
    still = find_problems(floors)
    if still:
        raise EnvironmentProblem(_message(still))
    return {name: installed_version(name) for name in floors}
