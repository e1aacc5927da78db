#!/usr/bin/env bash
# On the GPU machine: tokenizes the corpus once, then trains DrDiff, the autoregressive baseline (same
# size, same tokens) and the autoregressive judge side by side, each as a background chain of runs of
# at most $DRDIFF_RUN_MINUTES that resume from their checkpoints.
#
#   scripts/train_gpu.sh start RUNS_DIR       # returns at once; training goes on (setsid)
#   scripts/train_gpu.sh status RUNS_DIR      # the last log line of each
#
# Budgets (minutes of training each, compilation not counted): DRDIFF_BUDGET (11), AR_BUDGET (11),
# JUDGE_BUDGET (7); a file RUNS/NAME.budget, once written, overrides a budget (read every 25 steps: a
# lease's length is known only after its machine has started). DRDIFF_MODELS names the models to train
# ("drdiff ar judge"; "drdiff" gives DrDiff the GPU alone). Each run of a chain lasts DRDIFF_RUN_MINUTES
# (20) of wall time; a run that fails (out of memory, say) is followed by one that resumes from its last
# checkpoint (saved every 2 minutes), up to 6 runs. DRDIFF_TOKENS_PER_STEP sets DrDiff's batch (122,880;
# the baselines keep that); DRDIFF_INIT=DIR starts DrDiff from a model directory's weights (drdiff.train
# --init) and DRDIFF_CONFIG overrides fields of its configuration (JSON). DRDIFF_GPU_BUILD=DIR also builds the GPU lane's CUDA tests in DIR in the
# background and runs them once the build is done and DRDIFF_CTEST_DELAY seconds (240) have passed, so
# that the trainers have taken their memory first (ctest -L cuda; log DIR.ctest.log).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:?start or status}
runs=${2:?runs folder}
corpus=${DRDIFF_CORPUS:-$root/data/corpus}
tok=${DRDIFF_TOKENIZER:-$root/models/drdiff-text/tokenizer.model}
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
chain() {  # name kind budget seed [config] [tokens per step] [model directory to start from]
  local name=$1 kind=$2 budget=$3 seed=$4 cfg=${5:-} tps=${6:-122880} init=${7:-}
  local out=$runs/$name
  mkdir -p "$out"
  for _ in 1 2 3 4 5 6; do
    python3 -m drdiff.train --kind "$kind" --corpus "$corpus" --tokenizer "$tok" --out "$out" \
      --budget "$budget" --budget-file "$runs/$name.budget" --minutes "${DRDIFF_RUN_MINUTES:-20}" --seed "$seed" \
      --tokens-per-step "$tps" ${cfg:+--config "$cfg"} ${init:+--init "$init"} >> "$out/stdout.log" 2>&1 \
      || echo "FAILED" >> "$out/stdout.log"
    grep -q '"kind": "done"' "$out/log.jsonl" 2>/dev/null && return 0
  done
}
case "$mode" in
  start)
    mkdir -p "$runs/tokens"
    python3 -m drdiff.data --corpus "$corpus" --tokenizer "$tok" --cache "$runs/tokens" | tee "$runs/tokens.log"
    # The bf16 GEMM rate with the GPU to itself (each trainer also measures it, but they share the GPU).
    python3 -c "import json, torch; from drdiff.train import gemm_rate; print(json.dumps({'gemm_flops': gemm_rate(torch.device('cuda')), 'gpu': torch.cuda.get_device_name()}))" | tee "$runs/gemm.json"
    export -f chain; export runs corpus tok
    models=" ${DRDIFF_MODELS:-drdiff ar judge} "
    # Each trainer is started by this shell itself: in an 'a && b &' list the backgrounded subshell
    # would wait for the trainer with the caller's stdout open (a pipe to tail never ended).
    if [[ $models == *" drdiff "* ]]; then
      setsid bash -c "chain drdiff diffusion ${DRDIFF_BUDGET:-11} 1 '${DRDIFF_CONFIG:-}' ${DRDIFF_TOKENS_PER_STEP:-122880} '${DRDIFF_INIT:-}'" > /dev/null 2>&1 < /dev/null &
    fi
    if [[ $models == *" ar "* ]]; then
      setsid bash -c "chain ar ar ${AR_BUDGET:-11} 2" > /dev/null 2>&1 < /dev/null &
    fi
    if [[ $models == *" judge "* ]]; then
      setsid bash -c "chain judge ar ${JUDGE_BUDGET:-7} 3 '{\"d_model\": 320, \"heads\": 5}'" > /dev/null 2>&1 < /dev/null &
    fi
    echo "started:$models in $runs"
    if [ -n "${DRDIFF_GPU_BUILD:-}" ]; then  # meanwhile, the lane's CUDA tests (model.cuda is rerun by gpu_finish.sh)
      b=$DRDIFF_GPU_BUILD
      targets="drdiff.test.attention.cuda drdiff.test.attention.cuda.mma drdiff.test.attention.policy.cuda drdiff.test.solver.cuda"
      targets="$targets drdiff.test.attention.backward.cuda"
      targets="$targets drdiff.test.router.cuda drdiff.test.anchor.cuda drdiff.test.model.cuda drdiff.test.concurrency.cuda"
      setsid bash -c "cmake -S '$root' -B '$b' -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH='$root/.deps' \
        -DDRDIFF_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DDRDIFF_BUILD_EXAMPLES=OFF -DDRDIFF_BUILD_BENCHMARKS=OFF \
        > '$b.log' 2>&1 && nice cmake --build '$b' -j 10 --target $targets >> '$b.log' 2>&1; echo BUILD_DONE \$? >> '$b.log'; \
        while [ \$(( \$(date +%s) - $(date +%s) )) -lt ${DRDIFF_CTEST_DELAY:-240} ]; do sleep 5; done; \
        cd '$b' && LD_LIBRARY_PATH='$root/.deps/lib/runtime':\${LD_LIBRARY_PATH:-} ctest -L cuda --output-on-failure -R 'drdiff.test.(attention|solver|router|anchor|model|concurrency)' \
        > '$b.ctest.log' 2>&1; echo CTEST_DONE \$? >> '$b.ctest.log'" > /dev/null 2>&1 < /dev/null &
    fi
    ;;
  status)
    for n in drdiff ar judge; do
      [ -d "$runs/$n" ] || continue
      echo "== $n: $(tail -1 "$runs/$n/log.jsonl" 2>/dev/null | cut -c1-400)"
      grep -E 'Error|FAILED|Traceback' "$runs/$n/stdout.log" 2>/dev/null | tail -3 || true
      grep -c '"skip"' "$runs/$n/log.jsonl" 2>/dev/null | sed 's/^/   skipped updates: /' || true
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    if [ -n "${DRDIFF_GPU_BUILD:-}" ]; then
      tail -n 1 "$DRDIFF_GPU_BUILD.log" 2>/dev/null
      grep -E 'tests passed|Failed|\*\*\*|CTEST_DONE' "$DRDIFF_GPU_BUILD.ctest.log" 2>/dev/null | tail -12
    fi
    n_done=$(cat "$runs"/{drdiff,ar,judge}/log.jsonl 2>/dev/null | grep -c '"kind": "done"')
    echo "runs done: $n_done of $(ls -d "$runs"/{drdiff,ar,judge} 2>/dev/null | wc -l)"
    ;;
  *) echo "train_gpu: unknown mode $mode" >&2; exit 2 ;;
esac
