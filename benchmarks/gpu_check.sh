#!/usr/bin/env bash
# The GPU check (issue 16): how fast the real model trains, and kernel.py's whole run on
# CUDA (interrupted, resumed, predict-only, under torchrun), as one prepared script.
#
#   bash benchmarks/gpu_wheels.sh             # here, once: the wheels the GPU machine lacks
#   bash benchmarks/gpu_check.sh              # there, from the repository root: planned for 8 minutes
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps at toy size on the CPU (a CI test)
#
# Results: $OUT/gpu_check.json (each step ok or failed, with its seconds; the training
# figures and whether they meet the targets), rewritten after every step, and
# $OUT/gpu_check.log. OUT defaults to a new temporary folder. A failed step does not stop
# the later ones; the exit code is 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

# Settings: the real check, then the toy size of --cpu-smoke.
case "${1:-}" in
  "")
    MODE=gpu
    ARCH=resnext101_32x8d PRECISION=bf16 BATCH=32 WORKERS=16
    BENCH_SIZE=512 BENCH_STEPS=100 COMPILE=inductor
    PATIENTS=200 TEST_PATIENTS=50 SLICE_SIZE=512  # about 3,000 slices of 512x512
    KERNEL_SIZE=256 VAL_FRAC=0.1 ;;
  --cpu-smoke)
    MODE=cpu-smoke
    ARCH=resnet18 PRECISION=fp32 BATCH=4 WORKERS=2
    # inductor spends ~40 s generating C++ on 2 cores; aot_eager traces the same graphs
    BENCH_SIZE=32 BENCH_STEPS=2 COMPILE=aot_eager
    PATIENTS=4 TEST_PATIENTS=2 SLICE_SIZE=64
    KERNEL_SIZE=32 VAL_FRAC=0.5  # two validation patients: the refiner's folds need them
    export OMP_NUM_THREADS=1 ;;  # few shared cores: more threads than cores slow torch down
  *)
    echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2
    exit 2 ;;
esac
TARGET_IMAGES_S=600  # resnext101_32x8d training at 512 px in bf16 on one H200, fed by the loader
TARGET_RATIO=0.9     # fed by the loader / the model alone
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)    # data, runs and the step records: too large or too many for $OUT
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

KERNEL=("$PYTHON" kernel.py --data-dir "$WORK/data" --out-dir "$WORK/run" --arch "$ARCH"
        --weights none --epochs 1 --image-size "$KERNEL_SIZE" --batch-size "$BATCH"
        --workers "$WORKERS" --precision "$PRECISION" --val-frac "$VAL_FRAC"
        --context 1 --refine --header-cache "$WORK/cache")
BENCH=("$PYTHON" benchmarks/bench_train.py --arch "$ARCH" --size "$BENCH_SIZE" --batch-size "$BATCH"
       --workers "$WORKERS" --steps "$BENCH_STEPS" --precision "$PRECISION")


# One step: logged, timed and recorded as ok or failed; $OUT/gpu_check.json is rewritten.
step() {
  local name=$1 status=ok start ms
  shift
  echo
  echo "=== $name: $*"
  start=$(date +%s%N)
  "$@" || status=failed
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  echo "=== $name: $status in $((ms / 1000)).$((ms % 1000 / 100)) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$ms" "$*" >> "$WORK/steps.tsv"
  summarize
}

install_wheels() {
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

versions() {
  "$PYTHON" -c "import json, kernel; print(json.dumps(kernel.environment(), indent=2))" \
    > "$WORK/versions.json" &&
    cat "$WORK/versions.json"
}

make_data() {
  "$PYTHON" -c "from utils.demo import make_demo_dataset
make_demo_dataset('$WORK/data', n_train_patients=$PATIENTS, n_test_patients=$TEST_PATIENTS,
                  size=$SLICE_SIZE)" &&
    echo "$(find "$WORK/data" -name '*.dcm' | wc -l) slices of ${SLICE_SIZE}x${SLICE_SIZE} in $WORK/data"
}

# Ctrl-C as soon as the epoch starts: kernel.py finishes the step it is in, saves
# last.pt and exits with 3 (a second Ctrl-C would abort; a first one before the
# training loop would too, so the script waits for the progress bar).
train_interrupted() {
  local pid rc
  "${KERNEL[@]}" > "$WORK/interrupted.log" 2>&1 &
  pid=$!
  until grep -q "epoch 1/1" "$WORK/interrupted.log"; do
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.05
  done
  kill -INT "$pid"
  wait "$pid"
  rc=$?
  cat "$WORK/interrupted.log"
  echo "exit code $rc (3: stopped with a checkpoint)"
  [ "$rc" -eq 3 ] && [ -f "$WORK/run/checkpoints/last.pt" ]
}

resume() {
  "${KERNEL[@]}" --resume 2>&1 | tee "$WORK/resumed.log" &&
    grep -q "Resuming at epoch 1, batch" "$WORK/resumed.log" &&
    [ -f "$WORK/run/metrics.json" ] && [ -f "$WORK/run/submission.csv" ]
}

predict_only() {
  "$PYTHON" kernel.py --predict-only --checkpoint "$WORK/run/checkpoints/best.pt" \
    --data-dir "$WORK/data" --out-dir "$WORK/predicted" --workers "$WORKERS" \
    --precision "$PRECISION" --header-cache "$WORK/cache" &&
    [ -f "$WORK/predicted/submission.csv" ]
}

# kernel.py under torchrun, tiny. With one process kernel.py does not form a process
# group (utils.engine.init_distributed), so the next step tries the backend itself.
torchrun_kernel() {
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 kernel.py \
    --out-dir "$WORK/torchrun" --demo-patients 6 --arch resnet18 --image-size 32 --epochs 1 \
    --workers 0 --context 1 --refine --precision "$PRECISION" &&
    [ -f "$WORK/torchrun/submission.csv" ]
}

all_reduce() {
  cat > "$WORK/all_reduce.py" <<'PY'
import torch
import torch.distributed as dist

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
x = torch.ones(4, device="cuda" if cuda else "cpu") * (dist.get_rank() + 1)
dist.all_reduce(x)
print(f"{dist.get_backend()} all_reduce over {dist.get_world_size()} process(es): {x.tolist()}")
assert x.tolist() == [float(sum(range(1, dist.get_world_size() + 1)))] * 4
dist.destroy_process_group()
PY
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 "$WORK/all_reduce.py"
}

# $OUT/gpu_check.json from the step records and the benchmark figures so far.
summarize() {
  MODE=$MODE TARGET_IMAGES_S=$TARGET_IMAGES_S TARGET_RATIO=$TARGET_RATIO \
    "$PYTHON" - "$WORK" "$OUT/gpu_check.json" <<'PY'
import json, os, sys
from pathlib import Path

from utils.atomic import atomic_write

work, out = Path(sys.argv[1]), Path(sys.argv[2])
target, ratio = float(os.environ["TARGET_IMAGES_S"]), float(os.environ["TARGET_RATIO"])
smoke = os.environ["MODE"] == "cpu-smoke"


def read(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None


def figures(bench):
    if bench is None:
        return None
    train = bench["train"]
    return {"images_s_alone": train["alone"], "images_s_fed": train["fed"],
            "fed_over_alone": train["ratio"], "loader_images_s_alone": bench["loader_alone"],
            # the targets are the H200's: the toy size on a CPU says nothing of them
            "met": None if smoke else train["fed"] >= target and train["ratio"] >= ratio}


lines = (work / "steps.tsv").read_text().splitlines()
steps = [{"name": n, "ok": s == "ok", "seconds": int(ms) / 1000, "command": c}
         for n, s, ms, c in (line.split("\t") for line in lines)]
eager, compiled = read("bench.json"), read("bench_compiled.json")
settings = ("arch", "size", "batch_size", "workers", "steps", "precision", "channels_last", "device")
training = {k: eager[k] for k in settings} if eager is not None else {}
training.update(eager=figures(eager), compiled=figures(compiled))
met = [f["met"] for f in (training["eager"], training["compiled"]) if f is not None]
result = {"mode": os.environ["MODE"], "all_ok": all(s["ok"] for s in steps), "steps": steps,
          "versions": read("versions.json"), "training": training,
          "target": {"images_s_fed": target, "fed_over_alone": ratio,
                     "met": None if smoke or not met else any(met)}}
atomic_write(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
PY
}

main() {
  echo "gpu_check $MODE: results in $OUT"
  if [ "$MODE" = cpu-smoke ]; then
    echo "no wheels installed: .whl/ holds them for the GPU machine's Python 3.12"
  elif [ -d .whl ]; then
    step wheels install_wheels
  else
    echo "no .whl/: the installed packages are used (benchmarks/gpu_wheels.sh writes it)"
  fi
  if [ "$MODE" = gpu ]; then
    step nvidia-smi nvidia-smi
  fi
  step versions versions
  step bench "${BENCH[@]}" --json "$WORK/bench.json"
  step bench_compiled "${BENCH[@]}" --compile "$COMPILE" --phases train --json "$WORK/bench_compiled.json"
  step data make_data
  step train_interrupted train_interrupted
  step resume resume
  step predict_only predict_only
  step torchrun torchrun_kernel
  step all_reduce all_reduce
  echo
  cat "$OUT/gpu_check.json" && ! grep -q $'\tfailed\t' "$WORK/steps.tsv"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
