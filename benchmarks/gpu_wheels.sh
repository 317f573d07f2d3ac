#!/usr/bin/env bash
# The wheels the GPU machine lacks, downloaded here into .whl/ (ignored by git), so that
# benchmarks/gpu_check.sh installs them there with no network.
#
#   bash benchmarks/gpu_wheels.sh
#
# That machine (nvidia-h200: /work/.library/device/KINDS.md) runs Python 3.12 with torch,
# torchvision, numpy, pandas, pyarrow, scipy, opencv-python-headless, PyYAML, pillow, tqdm
# and matplotlib installed; pydicom and albumentations, with the dependencies it has
# nothing of, are missing. The copied working tree may hold 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64

# Versions pinned in requirements.txt, read from there.
pinned() {
  grep -i -m1 "^$1==" requirements.txt
}
# Not pinned there: albumentations' and albucore's own dependencies, at the versions
# the project's tests run with. The machine has typing_extensions, but pydantic needs
# >= 4.16 of it: the pinned one travels too (46 KB).
WANTED=(
  "$(pinned pydicom)"
  "$(pinned albumentations)"
  "$(pinned albucore)"
  "$(pinned pydantic)"
  "$(pinned pydantic_core)"
  "$(pinned typing_extensions)"
  annotated_types==0.8.0
  typing_inspection==0.4.5
  stringzilla==5.3.2
  simsimd==6.5.16
)

rm -rf "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WANTED[@]}"

ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in all (limit ${LIMIT_MIB} MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "error: the wheels exceed ${LIMIT_MIB} MiB, the most a copied working tree may hold" >&2
  exit 1
fi
