#!/usr/bin/env bash
# The GPU check: kernel.py's whole run on CUDA as a user runs it (bf16 interrupted and
# resumed, predict-only, fp16 as on Kaggle's T4, two processes), then how fast the real
# model trains, as one prepared script.
#
#   bash benchmarks/gpu_wheels.sh             # here, once: the wheels the GPU machine lacks
#   bash benchmarks/gpu_check.sh              # there, from the repository root: planned for 8 minutes
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps at toy size on the CPU (a CI test)
#
# Results: $OUT/gpu_check.json (each step ok or failed, with its seconds; the training
# figures and whether they meet the targets), rewritten after every step, and
# $OUT/gpu_check.log. OUT defaults to a new temporary folder. If the packages cannot be
# imported it stops at once, saying which; otherwise a failed step does not stop the later
# ones, and the exit code is 0 when every step passed.
#
# The plan, by each step's arithmetic on one H200 (16 cores): wheels, imports and versions
# 20 s; 3,000 slices of 512x512 written 40 s; bf16 run of resnext101_32x8d at 256 px over
# ~2,700 training slices, interrupted then resumed 70 s; predict-only 20 s; the same in fp16
# end to end 45 s; two processes on the one GPU 40 s; NCCL 10 s; throughput 40 s; compile
# last, cut off at 150 s: 7.5 minutes in all.
set -uo pipefail
cd "$(dirname "$0")/.."

# Settings: the real check, then the toy size of --cpu-smoke.
case "${1:-}" in
  "")
    MODE=gpu
    ARCH=resnext101_32x8d BATCH=32 WORKERS=16
    BENCH_SIZE=256 BENCH_STEPS=100 COMPILE=inductor COMPILE_SECONDS=150
    PATIENTS=200 TEST_PATIENTS=50 SLICE_SIZE=512  # about 3,000 slices of 512x512
    KERNEL_SIZE=256 VAL_FRAC=0.1 ;;
  --cpu-smoke)
    MODE=cpu-smoke
    ARCH=resnet18 BATCH=4 WORKERS=2
    # inductor spends ~40 s generating C++ on 2 cores; aot_eager traces the same graphs
    BENCH_SIZE=32 BENCH_STEPS=2 COMPILE=aot_eager COMPILE_SECONDS=300
    PATIENTS=4 TEST_PATIENTS=2 SLICE_SIZE=64
    KERNEL_SIZE=32 VAL_FRAC=0.5  # two validation patients: the refiner's folds need them
    export OMP_NUM_THREADS=1 ;;  # few shared cores: more threads than cores slow torch down
  *)
    echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2
    exit 2 ;;
esac
# resnext101_32x8d trains at ~129 GFLOP per 256 px image (3 x 2 x 16.4 GMAC x (256/224)^2):
# 600 images/s is 78 TFLOP/s, 8 % of the H200's dense bf16 peak (grouped convolutions reach
# a small share of it). At 512 px (~0.5 TFLOP an image) no loader-fed target is within reach.
TARGET_IMAGES_S=600  # training at 256 px in bf16 on one H200, fed by the loader
TARGET_RATIO=0.9     # fed by the loader / the model alone
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)    # data, runs and the step records: too large or too many for $OUT
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

# kernel.py on the check's data, as the array KERNEL: kernel_command RUN_NAME PRECISION. An
# array, not a function: a function run with & is a subshell, and SIGINT (ignored by a
# non-interactive shell's background jobs) would never reach kernel.py.
kernel_command() {
  KERNEL=("$PYTHON" kernel.py --data-dir "$WORK/data" --out-dir "$WORK/$1" --arch "$ARCH"
          --weights none --epochs 1 --image-size "$KERNEL_SIZE" --batch-size "$BATCH"
          --workers "$WORKERS" --precision "$2" --val-frac "$VAL_FRAC"
          --context 1 --refine --header-cache "$WORK/cache")
}
BENCH=("$PYTHON" benchmarks/bench_train.py --arch "$ARCH" --size "$BENCH_SIZE" --batch-size "$BATCH"
       --workers "$WORKERS" --steps "$BENCH_STEPS" --precision bf16)
if [ "$MODE" = cpu-smoke ]; then
  BENCH=("${BENCH[@]:0:${#BENCH[@]}-1}" fp32)
fi


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

# Every package the pipeline imports, before anything runs: without them every step fails.
imports() {
  local missing
  missing=$("$PYTHON" -c "
import importlib
for name in ('torch', 'torchvision', 'pydicom', 'numpy', 'pandas', 'pyarrow', 'albumentations',
             'cv2', 'tqdm', 'matplotlib', 'scipy'):
    try:
        importlib.import_module(name)
    except Exception as err:
        print(f'{name} ({type(err).__name__}: {err})')
" 2>&1)
  if [ -n "$missing" ]; then
    echo "gpu_check: stopped: cannot import $(echo "$missing" | paste -sd ';' -) - run" \
      "benchmarks/gpu_wheels.sh where there is PyPI and carry .whl/ along"
    return 1
  fi
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
# last.pt at its next check and exits with 3 (a second Ctrl-C would abort; a first one
# before the training loop would too, so the script waits for the progress bar).
bf16_interrupted() {
  local pid rc
  kernel_command bf16 bf16
  "${KERNEL[@]}" --log-every 1 > "$WORK/interrupted.log" 2>&1 &
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
  [ "$rc" -eq 3 ] && [ -f "$WORK/bf16/checkpoints/last.pt" ]
}

bf16_resumed() {
  kernel_command bf16 bf16
  "${KERNEL[@]}" --log-every 1 --resume 2>&1 | tee "$WORK/resumed.log" &&
    grep -q "Resuming at epoch 1, batch" "$WORK/resumed.log" &&
    [ -f "$WORK/bf16/metrics.json" ] && [ -f "$WORK/bf16/submission.csv" ]
}

predict_only() {
  "$PYTHON" kernel.py --predict-only --checkpoint "$WORK/bf16" \
    --data-dir "$WORK/data" --out-dir "$WORK/predicted" --workers "$WORKERS" \
    --precision bf16 --header-cache "$WORK/cache" &&
    [ -f "$WORK/predicted/submission.csv" ]
}

# fp16 with its grad scaler, end to end: what auto picks on Kaggle's T4 and P100.
fp16() {
  kernel_command fp16 fp16
  "${KERNEL[@]}" && [ -f "$WORK/fp16/submission.csv" ]
}

# Two processes, as on Kaggle's 2 x T4: kernel.py starts itself under torchrun. With one
# GPU here both share it, over gloo (NCCL refuses two ranks on one GPU).
two_processes() {
  "$PYTHON" kernel.py --processes 2 --out-dir "$WORK/two" --demo-patients 6 --arch resnet18 \
    --image-size 32 --epochs 1 --workers 0 --context 1 --refine 2>&1 | tee "$WORK/two.log" &&
    grep -q "Starting 2 processes under torchrun" "$WORK/two.log" &&
    [ -f "$WORK/two/submission.csv" ]
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

bench() {
  "${BENCH[@]}" --json "$WORK/bench.json"
}

# torch.compile from a cold cache can take minutes: last, and cut off.
bench_compiled() {
  timeout "$COMPILE_SECONDS" "${BENCH[@]}" --compile "$COMPILE" --phases train --json "$WORK/bench_compiled.json"
}

# $OUT/gpu_check.json from the step records and the benchmark figures so far.
summarize() {
  MODE=$MODE TARGET_IMAGES_S=$TARGET_IMAGES_S TARGET_RATIO=$TARGET_RATIO \
    "$PYTHON" - "$WORK" "$OUT/gpu_check.json" <<'PY'
import csv, json, os, sys
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


def kernel_loop(run):
    """kernel.py's own training speed (its history.csv): the loop a user runs, with --context 1
    (three slices read per image) and its checks, beside bench_train.py's bare step."""
    path = work / run / "history.csv"
    if not path.is_file():
        return None
    last = list(csv.DictReader(path.open()))[-1]
    return {"train_images_s": float(last["train_images_s"]), "skipped_steps": int(float(last["skipped_steps"]))}


result = {"mode": os.environ["MODE"], "all_ok": all(s["ok"] for s in steps), "steps": steps,
          "versions": read("versions.json"), "training": training,
          "kernel_loop": {"bf16": kernel_loop("bf16"), "fp16": kernel_loop("fp16")},
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
  imports || return 1
  if [ "$MODE" = gpu ]; then
    step nvidia-smi nvidia-smi
  fi
  step versions versions
  step data make_data
  step bf16_interrupted bf16_interrupted
  step bf16_resumed bf16_resumed
  step predict_only predict_only
  step fp16 fp16
  step two_processes two_processes
  step all_reduce all_reduce
  step bench bench
  step bench_compiled bench_compiled
  echo
  cat "$OUT/gpu_check.json" && ! grep -q $'\tfailed\t' "$WORK/steps.tsv"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
