#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests and the benchmark matrix, one report.
#   bash bench/gpu_suite.sh
# writes bench/results/<date>-<gpu>.md (+ a folder of JSON/logs) and, when $OUT names a folder,
# copies them there as $OUT/report.md and $OUT/results.tgz after every stage, so a run stopped
# by an outer time limit still leaves what it finished. Needs torch + triton (+ pytest, pytest-benchmark)
# preinstalled; the package is not installed: a symlink tree gives it its installed layout.
# QUICK=1 runs a reduced matrix. Budget: under 10 minutes on an H100 (guarded below).
# To redo part of a run in a later call: STAGES="tests kernels bench train paper" (default: all) picks
# stages, MATRIX="ebm150-bf16 ddpm75-bf16" picks benchmark runs by name (default: all); the
# report ends with the command for the runs that did not fit. Exit code: 0 all passed; else the
# first failing test stage's (3: stopped at its time cap); 4: a benchmark run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
budget=${BUDGET_S:-560}
STAGES=${STAGES:-tests kernels bench train paper}
MATRIX=${MATRIX:-}
want() { [[ " $STAGES " == *" $1 "* ]]; }

# puregen_fast with kernels/ and train/ as its subpackages, as pyproject's package-dir mapping
# installs it. PYTHONSAFEPATH keeps `python -m` from putting the repo root (whose puregen_fast
# has no kernels/) ahead of the tree.
shadow=$(mktemp -d)
mkdir -p "$shadow/puregen_fast"
for f in puregen_fast/*; do ln -s "$repo/$f" "$shadow/puregen_fast/"; done
ln -s "$repo/kernels" "$shadow/puregen_fast/kernels"
ln -s "$repo/train" "$shadow/puregen_fast/train"
export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')")
tag="$(date -u +%Y%m%d-%H%M)-$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')"
report="bench/results/$tag.md"
jsondir="bench/results/$tag"
mkdir -p "$jsondir"
start=$(date +%s)

publish() {  # copy what exists so far to $OUT (two files: the report and one archive)
  [ -n "${OUT:-}" ] || return 0
  cp "$report" "$OUT/report.md" 2>/dev/null
  tar czf "$OUT/results.tgz" -C bench/results "$tag.md" "$tag" 2>/dev/null
}
left() { echo $(( budget - ($(date +%s) - start) )); }

{
  echo "# GPU suite: $gpu"
  echo
  echo "Run $(date -u +%FT%TZ) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  echo '```'
  $PY -m puregen_fast.cli info 2>&1
  echo '```'
  echo
  echo "## GPU tests"
  echo
} > "$report"
publish

# A stage gets min(its cap, what the budget leaves); SIGINT at the limit (pytest and the bench
# still print their summaries), SIGKILL 20 s later. `timeout`'s 124/137 become 3 here, so that
# a capped stage is not mistaken for the whole script being killed.
capped() {  # cap_s log cmd...: run, return its exit code (3 for a timeout, 75 when no time left)
  local cap=$1 log=$2; shift 2
  local lim=$(( $(left) - 30 ))
  [ "$lim" -gt "$cap" ] && lim=$cap
  if [ "$lim" -le 0 ]; then echo "no time left in the budget" > "$log"; return 75; fi
  timeout -s INT -k 20 "$lim" "$@" > "$log" 2>&1
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "(stopped at its ${lim} s limit)" >> "$log"; return 3; fi
  return "$rc"
}

pytest_stage() {  # cap_s name pytest-args...
  local cap=$1 name=$2; shift 2
  capped "$cap" "$jsondir/$name.log" $PY -m pytest -q -p no:cacheprovider --durations=10 "$@"
  local rc=$?
  { echo "### $name (exit code $rc)"; echo; echo '```'; tail -n 40 "$jsondir/$name.log"
    echo '```'; echo; } >> "$report"
  [ "$rc" -eq 0 ] || [ "$test_rc" -ne 0 ] || test_rc=$rc  # the first failure is the run's
  publish
  return "$rc"
}

test_rc=0
if want tests; then
  # every kernel test runs on the GPU (compiled Triton, not the interpreter): bit-exact Philox,
  # kernels against their eager twins, block sizes, batch splits, device-tensor arguments
  pytest_stage 150 kernel-tests tests/kernels/test_noise_kernels.py tests/kernels/test_langevin.py \
    tests/kernels/test_ddpm.py
  # the samplers in a process of their own (a failed capture can poison the CUDA context)
  pytest_stage 240 sampler-tests -m gpu tests/sampling/test_fast_gpu.py
  # the EBM conv-block kernels: the covering subset and bf16/tf32 by the 2x rule, then the
  # energy gradient and the sampler with conv_impl triton, and auto's measurement
  pytest_stage 180 conv-tests tests/kernels/test_ebm_conv.py tests/sampling/test_conv_grad.py
  pytest_stage 120 eval-tests -m gpu tests/eval/test_eval.py
  echo "GPU tests exit code: $test_rc" >> "$report"
else
  echo "(not run: STAGES=$STAGES)" >> "$report"
fi
echo >> "$report"
publish

echo "## Kernel bandwidth (pytest-benchmark medians)" >> "$report"
echo '```' >> "$report"
if want kernels; then
  # the machine code (registers, local memory, access widths) next to the timings
  capped 60 "$jsondir/kernel-asm.log" $PY bench/kernel_asm.py
  rc=$?
  [ "$rc" -eq 0 ] || [ "$test_rc" -ne 0 ] || test_rc=$rc  # kernels that do not build fail the run
  grep -v -i warn "$jsondir/kernel-asm.log" | tail -n 30 >> "$report"
  echo >> "$report"
  capped 180 "$jsondir/bench-kernels.log" $PY -m pytest bench/bench_kernels.py -q \
    -p no:cacheprovider --benchmark-columns=median,ops
  tail -n 50 "$jsondir/bench-kernels.log" >> "$report"
else
  echo "(not run: STAGES=$STAGES)" >> "$report"
fi
{ echo '```'; echo "## Throughput"; echo; } >> "$report"
publish

skipped=()     # did not start or did not finish: the "next" command reruns them
bench_failed=0
bench() {  # need_s name bench-args...: run if at least need_s of the budget is left
  local need=$1 name=$2; shift 2
  want bench || return 0
  if [ -n "$MATRIX" ] && [[ " $MATRIX " != *" $name "* ]]; then return 0; fi
  if [ "$(left)" -lt "$need" ]; then
    echo "skipped $name: $(left) s of the budget left, it needs about $need s" >> "$report"
    skipped+=("$name"); return
  fi
  capped 600 "$jsondir/$name.log" $PY -m puregen_fast.cli bench "$@" \
    --json "$jsondir/$name.json" --md "$report"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "bench $name failed (exit $rc): $(tail -n 3 "$jsondir/$name.log")" >> "$report"
    if [ "$rc" -eq 3 ] || [ "$rc" -eq 75 ]; then skipped+=("$name"); else bench_failed=1; fi
  fi
  publish
}

if [ "${QUICK:-0}" = 1 ]; then
  bench 30 ebm-small --method ebm --model small --batch-size 64 --steps 20 --precision fp32
  bench 30 ddpm-small --method ddpm --model small --batch-size 64 --steps 10 --precision fp32
else
  # most important first; the guard skips what no longer fits (compiles dominate the time)
  # --profile: the top kernels of one more run of each backend, for "where the time goes"
  ebm() { bench 90 "ebm150-$1" --method ebm --model paper --batch-size 512 --steps 150 --precision "$1" \
    --repeats 3 --profile 12; }
  ddpm() { bench 180 "ddpm75-$1" --method ddpm --model paper --batch-size 512 --steps 75 --precision "$1" \
    --repeats 2 --backends authors,fast --profile 12; }
  # the EBM's convolutions A/B (issue 13): the Triton conv-block kernels against compiled
  # torch (cuDNN), same model, batch and steps; the plain ebm rows run --conv-impl auto, whose
  # measured times are in their report
  conv() { bench 90 "ebm150-$1-conv-$2" --method ebm --model paper --batch-size 512 --steps 150 \
    --precision "$1" --repeats 3 --backends fast --conv-impl "$2" --profile 12; }
  ebm bf16; conv bf16 triton; conv bf16 torch; ddpm bf16; conv fp32 triton; conv fp32 torch
  ebm fp32; ebm tf32; ddpm fp32; ddpm tf32
  # other batch sizes, bf16 (each compiles and captures anew)
  bench 60 ebm150-bf16-b128 --method ebm --model paper --batch-size 128 --steps 150 \
    --precision bf16 --repeats 3
  bench 60 ebm150-bf16-b2048 --method ebm --model paper --batch-size 2048 --steps 150 \
    --precision bf16 --repeats 2 --backends fast
  bench 90 ddpm75-bf16-b128 --method ddpm --model paper --batch-size 128 --steps 75 \
    --precision bf16 --repeats 2 --backends fast
  # inductor's Triton convolution/matmul templates (fused epilogues) against cuDNN; long compiles
  bench 240 ebm150-bf16-autotune --method ebm --model paper --batch-size 512 --steps 150 \
    --precision bf16 --repeats 3 --backends fast --compile-mode max-autotune-no-cudagraphs
  bench 300 ddpm75-bf16-autotune --method ddpm --model paper --batch-size 512 --steps 75 \
    --precision bf16 --repeats 2 --backends fast --compile-mode max-autotune-no-cudagraphs
  if $PY -c 'import diffusers' 2>/dev/null; then
    bench 120 ddpm75-diffusers --method ddpm --model paper --batch-size 512 --steps 75 \
      --precision fp32 --repeats 2 --backends diffusers
  fi
fi

# training on the GPU (issue 6's recipes through the fast sampler): last, it is not a target
next_stages=""
[ "${#skipped[@]}" -gt 0 ] && next_stages="bench"
if want train; then
  echo "## Training on the GPU" >> "$report"
  echo >> "$report"
  if [ "$(left)" -ge 180 ]; then  # capped gets min(150, left - 30)
    pytest_stage 150 train-tests -m gpu tests/train/test_gpu.py
    rc=$?
    if [ "$rc" -eq 3 ]; then next_stages="${next_stages:+$next_stages }train"; fi
  else
    echo "skipped: $(left) s of the budget left, it needs about 150 s" >> "$report"
    next_stages="${next_stages:+$next_stages }train"
  fi
fi

# the paper's CIFAR-10 Narcissus row, reduced (one target class, one seed, airbench, no defense
# vs PureGen-EBM with the authors' published EBM and triggers); README "Evaluating a defense".
# Runs only where the data is: CIFAR10_DIR (cifar-10-batches-py) and POISONS_DIR (a copy of
# the authors' poisons dataset with Narcissus/cifar10/size=32_eps=8/best_noise_lab2.npy);
# EBM_SRC (default the published EBM, which must then be in the Hugging Face cache).
if want paper; then
  echo "## The paper's Narcissus row (reduced)" >> "$report"
  echo >> "$report"
  narc="${POISONS_DIR:-}/Narcissus/cifar10/size=32_eps=8/best_noise_lab2.npy"
  if [ ! -f "${CIFAR10_DIR:-/nonexistent}/data_batch_1" ] || [ ! -f "$narc" ]; then
    echo "skipped: needs CIFAR10_DIR (cifar-10-batches-py) and POISONS_DIR (the authors' poisons; $narc)" >> "$report"
  elif [ "$(left)" -lt 240 ]; then
    echo "skipped: $(left) s of the budget left, it needs about 240 s" >> "$report"
    next_stages="${next_stages:+$next_stages }paper"
  else
    capped 210 "$jsondir/paper.log" $PY -m puregen_fast.cli eval experiment --dataset cifar10 \
      --data-dir "$CIFAR10_DIR" --test-dataset cifar10 --test-data-dir "$CIFAR10_DIR" \
      --attack narcissus --poisons "$POISONS_DIR" --target-class 2 --count 500 \
      --defenses none,ebm ${EBM_SRC:+--ebm "$EBM_SRC"} --purify-batch-size 512 \
      --classifier airbench --seeds 0 --device cuda --quiet --out "$jsondir/paper"
    rc=$?
    { echo "exit code $rc"; echo; cat "$jsondir/paper/table.md" 2>/dev/null || tail -n 20 "$jsondir/paper.log"
      echo; echo "Paper (ResNet-18, 200 epochs): no defense PSR 43.95 / acc 94.89; PureGen-EBM PSR 1.39 / acc 92.98"
    } >> "$report"
    [ "$rc" -eq 3 ] && next_stages="${next_stages:+$next_stages }paper"
  fi
  publish
fi

{ echo; echo "Suite wall time: $(( $(date +%s) - start )) s"; } >> "$report"
if [ -n "$next_stages" ]; then
  matrix=""
  [ "${#skipped[@]}" -gt 0 ] && matrix=" MATRIX=\"${skipped[*]}\""
  next="STAGES=\"$next_stages\"$matrix${QUICK:+ QUICK=$QUICK} bash bench/gpu_suite.sh"
  { echo; echo "To run what did not fit: \`$next\`"; } >> "$report"
  echo "next: $next"
fi
publish
echo "report: $report"
rm -rf "$shadow"
# 0 all passed; the first failing test stage's code (3: stopped at its limit); 4: a bench failed
[ "$test_rc" -ne 0 ] && exit "$test_rc"
[ "$bench_failed" -ne 0 ] && exit 4
exit 0
