"""The environment check (the notebook's first cell) and the wheels dataset it installs from."""
import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from utils import envcheck
from utils.envcheck import FLOORS, EnvironmentProblem, check_environment, find_problems, read_pins, release
from utils.export import wheel_pins

ROOT = Path(__file__).resolve().parents[1]


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of distribution `name` (one module), as pip accepts it."""
    dist = re.sub(r"[-_.]+", "_", name).lower()
    info = f"{dist}-{version}.dist-info"
    files = {f"{dist}_module.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def test_floors_are_the_versions_ci_tests():
    oldest = read_pins(ROOT / "requirements-oldest.txt")
    pins = {name: line.split("==", 1)[1].strip() for name, line in oldest.items()}
    for name, floor in FLOORS.items():
        if name in envcheck.STATED_ONLY:
            assert release(pins[name]) >= release(floor), name  # CI runs a newer one than stated
        else:
            assert pins[name] == floor, name
    for name, (floor, _) in envcheck.OPTIONAL.items():
        assert pins[name] == floor, name


def test_release_reads_the_numbers_of_a_version():
    assert release("2.6.0+cu124") == (2, 6, 0)
    assert release("1.26.4") == (1, 26, 4)
    assert release("4.10.0.84") > release("4.9.0.80")
    assert release("3.0.0rc1") == (3, 0, 0)
    assert release("garbage") == ()


def test_problems_name_what_is_missing_or_too_old():
    assert find_problems() == {}  # this environment is supported
    problems = find_problems({"pydicom": "99.0", "no-such-package-here": "1.0", "numpy": "1.0"})
    assert set(problems) == {"pydicom", "no-such-package-here"}
    assert "older than 99.0" in problems["pydicom"]
    assert problems["no-such-package-here"] == "not installed (need >= 1.0)"


def test_it_stops_with_one_message_saying_what_to_attach(tmp_path, capsys):
    with pytest.raises(EnvironmentProblem) as err:
        check_environment({"pydicom": "99.0", "numpy": "1.0"}, wheels_root=tmp_path)
    message = str(err.value)
    assert "pydicom" in message and "numpy" not in message
    assert "--with-wheels" in message and "pip install --no-index --find-links" in message
    assert capsys.readouterr().out.startswith(f"Python {sys.version.split()[0]} | pydicom ")
    with pytest.raises(EnvironmentProblem, match="newer environment") as err:  # no wheels of ours help
        check_environment({"torch": "99.0"}, wheels_root=tmp_path)
    assert "--with-wheels" not in str(err.value)


def test_it_installs_what_is_missing_from_attached_wheels(tmp_path, monkeypatch):
    dataset = tmp_path / "input" / "my-wheels"
    dataset.mkdir(parents=True)
    make_wheel(dataset, "rsna-fake-package", "1.2.0")
    make_wheel(dataset, "rsna-fake-package", "0.9.0")  # the pin decides, not the newest
    (dataset / envcheck.WHEELS_MARKER).write_text("rsna-fake-package==1.2.0\n")
    site = tmp_path / "site"
    monkeypatch.setenv("PIP_TARGET", str(site))  # not into the test's own environment
    monkeypatch.syspath_prepend(str(site))
    site.mkdir()
    versions = check_environment({"rsna-fake-package": "1.0", "numpy": "1.0"}, wheels_root=tmp_path / "input")
    assert versions["rsna-fake-package"] == "1.2.0"
    assert (site / "rsna_fake_package_module.py").is_file()


def test_a_missing_optional_package_never_stops_the_run(tmp_path, capsys):
    optional = {"rsna-no-such-decoder": ("1.0", "files of its kind are skipped"), "numpy": ("1.0", "never")}
    versions = check_environment({"numpy": "1.0"}, wheels_root=tmp_path, optional=optional)
    assert set(versions) == {"numpy"}
    out = capsys.readouterr().out
    assert "rsna-no-such-decoder" in out and "files of its kind are skipped" in out and "never" not in out
    # with mandatory problems too, the message names the mandatory ones only
    with pytest.raises(EnvironmentProblem) as err:
        check_environment({"pydicom": "99.0"}, wheels_root=tmp_path, optional=optional)
    assert "rsna-no-such-decoder" not in str(err.value)


def test_an_optional_package_is_installed_from_attached_wheels_and_a_failed_install_is_no_error(tmp_path, monkeypatch):
    dataset = tmp_path / "input" / "my-wheels"
    dataset.mkdir(parents=True)
    make_wheel(dataset, "rsna-fake-decoder", "2.0.0")
    (dataset / envcheck.WHEELS_MARKER).write_text("rsna-fake-decoder==2.0.0\nrsna-absent-decoder==1.0\n")
    site = tmp_path / "site"
    monkeypatch.setenv("PIP_TARGET", str(site))
    monkeypatch.syspath_prepend(str(site))
    site.mkdir()
    left = envcheck.check_optional({"rsna-fake-decoder": ("2.0", "skipped")}, wheels_root=tmp_path / "input")
    assert left == {} and (site / "rsna_fake_decoder_module.py").is_file()
    left = envcheck.check_optional({"rsna-absent-decoder": ("1.0", "skipped")}, wheels_root=tmp_path / "input")
    assert set(left) == {"rsna-absent-decoder"}  # pip failed: said, not raised


def test_the_check_needs_nothing_but_the_standard_library():
    tree = ast.parse((ROOT / "utils" / "envcheck.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}


@pytest.mark.slow
def test_export_with_wheels_downloads_every_pin_but_torch(tmp_path):
    index = tmp_path / "index"  # a local package index: pip really runs, offline
    index.mkdir()
    pins = wheel_pins(ROOT)
    assert not any(p.startswith(("torch==", "torchvision==")) for p in pins)
    assert any(p.startswith("pydicom==") for p in pins) and len(pins) >= 15
    assert {p.split("==")[0] for p in pins} >= set(envcheck.OPTIONAL)  # the decoders and nibabel travel too
    for pin in pins:
        make_wheel(index, *pin.split("=="))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERNEL_ARGS")}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index))
    out = tmp_path / "k"
    run = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--export-kaggle", str(out),
                          "--kaggle-id", "me/my-kernel", "--with-wheels"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"kaggle datasets create -p {out / 'wheels'}" in run.stdout
    assert len(list((out / "wheels").glob("*.whl"))) == len(pins)
    assert (out / "wheels" / envcheck.WHEELS_MARKER).read_text().splitlines() == pins
    dataset = json.loads((out / "wheels" / "dataset-metadata.json").read_text())
    assert dataset["id"] == "me/rsna-hemorrhage-wheels"
    kernel = json.loads((out / "kernel-metadata.json").read_text())
    assert kernel["dataset_sources"] == ["me/rsna-hemorrhage-wheels"]

    broken = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--export-kaggle", str(tmp_path / "k2"),
                             "--with-wheels"], capture_output=True, text=True, cwd=ROOT,
                            env=dict(env, PIP_FIND_LINKS=str(tmp_path / "empty")), timeout=300)
    assert broken.returncode == 4 and "pip download failed" in broken.stderr
    alone = subprocess.run([sys.executable, str(ROOT / "kernel.py"), "--with-wheels"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=120)
    assert alone.returncode == 2 and "--with-wheels belongs to --export-kaggle" in alone.stderr
