"""read_header of this checkout against that of an earlier revision, in one process.

    python benchmarks/bench_header_rev.py --base 854aa53 [--rounds 20]

The earlier utils/dicom.py is loaded from git beside the current one and both read the
same files (the real RSNA sample when it is present, else synthetic slices of each
variant), alternately, best of 7; the ratio is what a change to the header reader costs.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils import dicom  # noqa: E402
from utils.demo import write_plain_slices  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "rsna_sample"


def load_revision(rev: str, folder: Path):
    source = subprocess.run(["git", "show", f"{rev}:utils/dicom.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = folder / "dicom_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dicom_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dicom_base"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def per_header_us(module, files: list[Path], rounds: int) -> float:
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(rounds):
            for f in files:
                module.read_header(f)
        best = min(best, time.perf_counter() - t)
    return best / (rounds * len(files)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--rounds", type=int, default=20, help="passes over the files per timing")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")
    with tempfile.TemporaryDirectory() as folder:
        files = sorted(SAMPLE.glob("stage_2_*/*.dcm")) or write_plain_slices(Path(folder) / "slices", 30)
        base = load_revision(args.base, Path(folder))
        for _ in range(2):
            old, new = per_header_us(base, files, args.rounds), per_header_us(dicom, files, args.rounds)
            print(f"read_header on {len(files)} files: {args.base} {old:.1f} us, this checkout {new:.1f} us, "
                  f"ratio {new / old:.3f}")


if __name__ == "__main__":
    main()
