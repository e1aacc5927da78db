#!/usr/bin/env bash
# On the GPU machine, after scripts/train_gpu.sh has finished: exports DrDiff's EMA weights as the
# model directory, makes the parity golden files with PyTorch, runs the CUDA model test (GPU forward of
# the checkpoint against them), evaluates quality against the AR baseline, and packs what comes back
# into $OUT (the model's weights in two parts, each under the 16 MiB a returned file may have; the
# baselines' weights as a tar in parts; the logs, plots, golden files and evaluation in results.tar.gz).
#
#   scripts/gpu_finish.sh RUNS_DIR BUILD_DIR          # all of it; the evaluation runs detached (setsid)
#                                                     # and is waited for up to DRDIFF_EVAL_WAIT s (420)
#   scripts/gpu_finish.sh RUNS_DIR BUILD_DIR pack     # later: wait for the evaluation again, then pack
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:?runs folder}
build=${2:?CUDA build folder with drdiff.test.model.cuda}
mode=${3:-all}
out=${OUT:-$root/out}
mkdir -p "$out" "$runs/pack"
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
tok=$root/models/drdiff-text/tokenizer.model
if [ "$mode" = all ]; then
set -e
python3 -m drdiff.export --checkpoint "$runs/drdiff/ema.pt" --tokenizer "$tok" --out "$runs/export/drdiff-text" \
  --steps 20 --solver 2m
cp "$runs/export/drdiff-text/model.safetensors" "$runs/export/drdiff-text/config.json" "$root/models/drdiff-text/"
python3 -m drdiff.golden --model "$root/models/drdiff-text" --corpus "$root/data/corpus" --out "$runs/golden"
cp "$runs/golden"/* "$root/test/model/golden/"  # for the CUDA model test, which reads them from the tree
set +e
if [ -x "$build/test/drdiff.test.model.cuda" ]; then
  "$build/test/drdiff.test.model.cuda" -s > "$runs/pack/model_cuda_test.log" 2>&1
  echo "drdiff.test.model.cuda: exit $? ($(grep -E 'test cases|All tests' "$runs/pack/model_cuda_test.log" | tail -1))"
  grep -E "relative L2|within|agree" "$runs/pack/model_cuda_test.log" | head -12
else
  echo "no CUDA test build in $build"; tail -20 "$build/../build.log" 2>/dev/null
fi
rm -f "$runs/eval.rc"
if [ ! -f "$runs/ar/ema.pt" ] || [ ! -f "$runs/judge/ema.pt" ]; then
  echo "no AR baseline or judge in $runs: the evaluation is left for a lease that trains them" | tee "$runs/pack/evaluate.log"
  echo skipped > "$runs/eval.rc"
else
setsid bash -c "timeout ${DRDIFF_EVAL_SECONDS:-900} python3 -m drdiff.evaluate --model '$runs/export/drdiff-text' \
  --ar '$runs/ar/ema.pt' --judge '$runs/judge/ema.pt' --corpus '$root/data/corpus' --out '$runs/eval' \
  > '$runs/pack/evaluate.log' 2>&1; echo \$? > '$runs/eval.rc'" > /dev/null 2>&1 < /dev/null &
fi
fi
# Wait for the evaluation (it saves quality.json after every section, so a cut-short one keeps what it measured).
for _ in $(seq 1 "${DRDIFF_EVAL_WAIT:-420}"); do [ -f "$runs/eval.rc" ] && break; sleep 1; done
echo "evaluate: $([ -f "$runs/eval.rc" ] && echo "exit $(cat "$runs/eval.rc")" || echo "still running")"
grep -vE "Warning|warn|^ *$" "$runs/pack/evaluate.log" | tail -40 | cut -c1-400
for n in drdiff ar judge; do
  mkdir -p "$runs/pack/$n"; cp "$runs/$n"/{log.jsonl,config.json,loss.png,stdout.log} "$runs/pack/$n/" 2>/dev/null
done
# From $runs, not the tree: a later call's copy of the working tree puts back the old model and golden files.
cp -r "$runs/eval" "$runs/golden" "$runs/pack/" 2>/dev/null
cp "$runs/tokens.log" "$runs/gemm.json" "$runs/pack/" 2>/dev/null
cp "$build.log" "$runs/pack/cuda_build.log" 2>/dev/null; cp "$build.ctest.log" "$runs/pack/cuda_ctest.log" 2>/dev/null
cp "$runs/export/drdiff-text/config.json" "$runs/pack/"
sha256sum "$runs/export/drdiff-text/model.safetensors" | tee "$runs/pack/model.sha256"
tar -C "$runs" -czf "$out/results.tar.gz" pack
split -b 15M -d "$runs/export/drdiff-text/model.safetensors" "$out/model.safetensors.part"
# The AR baseline's and the judge's EMA weights in bf16 (no optimizer state), for evaluations
# elsewhere: one tar in 15 MB parts.
rm -rf "$runs/baselines"; mkdir -p "$runs/baselines"
python3 - "$runs" <<'PY'
import sys, torch
runs = sys.argv[1]
for n in ("ar", "judge"):
    try:
        ck = torch.load(f"{runs}/{n}/ema.pt", map_location="cpu", weights_only=False)
    except FileNotFoundError:
        continue
    ck["weights"] = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in ck["weights"].items()}
    torch.save(ck, f"{runs}/baselines/{n}_ema_bf16.pt")
PY
tar -C "$runs" -cf - baselines | split -b 15M -d - "$out/baselines.tar.part"
ls -la "$out"
