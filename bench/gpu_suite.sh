#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests and the benchmark matrix, one report.
#   bash bench/gpu_suite.sh            (writes bench/results/<date>-<gpu>.{md,json} and copies to $OUT)
# Needs torch + triton preinstalled (no registry needed); works without installing the package.
# QUICK=1 runs a reduced matrix. Budget: under 10 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
out_dir=${OUT:-$repo/bench/results}
mkdir -p "$out_dir" bench/results

# Import puregen_fast (with kernels/ and train/ as its subpackages) without installing: a shadow
# tree of symlinks, the same layout pyproject's package-dir mapping installs.
shadow=$(mktemp -d)
mkdir -p "$shadow/puregen_fast"
for f in puregen_fast/*; do ln -s "$repo/$f" "$shadow/puregen_fast/"; done
ln -s "$repo/kernels" "$shadow/puregen_fast/kernels"
ln -s "$repo/train" "$shadow/puregen_fast/train"
export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-gpu')")
tag="$(date -u +%Y%m%d-%H%M)-$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')"
report="bench/results/$tag.md"
jsondir="bench/results/$tag"
mkdir -p "$jsondir"
start=$(date +%s)

{
  echo "# GPU suite: $gpu"
  echo
  echo "Run $(date -u +%FT%TZ) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  echo '```'
  python -m puregen_fast.cli info 2>&1
  echo '```'
  echo
  echo "## GPU tests"
  echo
  echo '```'
} > "$report"

python -m pytest -m "gpu" -q -p no:cacheprovider tests 2>&1 | tail -n 40 >> "$report"
test_rc=${PIPESTATUS[0]}
echo '```' >> "$report"
echo "pytest -m gpu exit code: $test_rc" >> "$report"
echo >> "$report"
echo "## Kernel bandwidth (pytest-benchmark medians)" >> "$report"
echo '```' >> "$report"
python -m pytest bench/bench_kernels.py -q -p no:cacheprovider --benchmark-columns=median,ops 2>&1 | tail -n 30 >> "$report"
echo '```' >> "$report"
echo "## Throughput" >> "$report"
echo >> "$report"

bench() {  # name, then bench args
  local name=$1; shift
  local left=$(( 560 - ($(date +%s) - start) ))
  if [ "$left" -lt 30 ]; then echo "skipped $name: suite time budget spent" >> "$report"; return; fi
  timeout "$left" python -m puregen_fast.cli bench "$@" --json "$jsondir/$name.json" --md "$report" \
    > "$jsondir/$name.log" 2>&1 || echo "bench $name failed (exit $?): $(tail -n 3 "$jsondir/$name.log")" >> "$report"
}

if [ "${QUICK:-0}" = 1 ]; then
  bench ebm-small --method ebm --model small --batch-size 64 --steps 20 --precision fp32
  bench ddpm-small --method ddpm --model small --batch-size 64 --steps 10 --precision fp32
else
  # most important first: the guard skips whatever no longer fits in the budget
  for prec in bf16 tf32 fp32; do
    bench "ebm150-$prec" --method ebm --model paper --batch-size 512 --steps 150 --precision "$prec" --repeats 3
    bench "ddpm75-$prec" --method ddpm --model paper --batch-size 512 --steps 75 --precision "$prec" \
      --repeats 2 --backends authors,fast
  done
  bench ddpm75-diffusers --method ddpm --model paper --batch-size 512 --steps 75 --precision fp32 \
    --repeats 2 --backends diffusers
fi

echo >> "$report"
echo "Suite wall time: $(( $(date +%s) - start )) s" >> "$report"
cp -r "$report" "$jsondir" "$out_dir"/ 2>/dev/null || true
echo "report: $report"
rm -rf "$shadow"
exit "$test_rc"
