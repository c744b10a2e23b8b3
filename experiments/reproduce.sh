#!/usr/bin/env bash
# RESULTS.md's figures, measured again on whatever device is here, in one command from anywhere:
#
#     bash experiments/reproduce.sh [OUT]           # one H100 or H200: at most 9 minutes, compiling included
#     bash experiments/reproduce.sh --smoke [OUT]   # every phase at tiny sizes on the CPU, in about a minute
#
# OUT (default: results; a relative path is taken from the repository's root, where the commands run)
# receives a log per phase and summary.md, rewritten as each phase ends; the models go to OUT-models beside
# it, so that OUT holds 8 small files at most. Each phase runs under its own time limit (LIMITS="a b c1 c2
# c3 d e", in seconds, sets them for a slower machine): a phase that fails or runs out of time is marked so
# in summary.md, and the next one starts, so what the finished phases measured stays.
#   a  the GPU tests (pytest -k test_cuda). If the captured decode step fails there, the later phases decode
#      eagerly (--eager); if compiled FlexAttention fails, they train with --compile=False
#   b  training: the default TiDAR model, `python train.py` as in the README's quick start
#   c  experiments/bench.py on it: decoding at batch 1 (k = 4, 8, 16; eager and captured, float32 and
#      bfloat16 on CUDA) on the val split's prompts (c1) and on Python from outside the corpus, pytest's own
#      sources (c2); then the batch sweep and the free token slots (c3)
#   d  bench.py's section 4: a training step against an AR step
#   e  the AR baseline of the training table, trained for about as long as b (by the step costs known)
# On a GPU the phases share a budget of 9 minutes: a phase gets what its limit and the budget leave, and
# one left with under 20 seconds is skipped, the last ones first.
set -u
cd "$(dirname "$0")/.."  # the repository's root: the commands below run from there
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
OUT=${1:-results}
MODELS=${OUT%/}-models
mkdir -p "$OUT" "$MODELS" || exit 1
MODELS=$(cd "$MODELS" && pwd)
rm -f "$OUT"/*.log "$OUT"/summary.md
export PYTHONUNBUFFERED=1
# The first of python, python3 that has what the project needs (a GPU machine's python may be another), and
# in the same start (torch takes seconds to import) what the summary names: torch's version, the device,
# and pytest's own sources, Python that is in no default corpus.
probe="import os, numpy, tiktoken, torch, pytest, _pytest
print(torch.__version__)
print(os.path.dirname(_pytest.__file__))
try:
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
except Exception as e:  # a GPU that cannot be named is still a GPU: the phases say what fails
    print(f'cuda ({type(e).__name__})')"
PY=""
for candidate in python python3; do
    if command -v "$candidate" > /dev/null && found=$("$candidate" -c "$probe" 2> /dev/null); then
        PY=$(command -v "$candidate")
        break
    fi
done
[ -n "$PY" ] || {
    echo "reproduce.sh: error: neither python nor python3 has torch, numpy, tiktoken and pytest:" \
         "pip install -r requirements.txt"
    exit 1
}
{ read -r torch_version; read -r outside; read -r device; } <<< "$found"

if [ $smoke = 1 ]; then  # the same commands at tiny sizes, on the CPU: checked end to end in about a minute
    "$PY" data/prepare.py --input README.md --name "$MODELS/data" --overwrite > /dev/null || exit 1
    tiny="--data_dir=$MODELS/data --device=cpu --n_layer=1 --n_head=2 --n_embd=32 --seq_len=64 --block_len=4
          --batch_size=4 --warmup_iters=2 --eval_interval=10 --eval_iters=2 --log_interval=5"
    train_args="$tiny --max_iters=20 --ar_iters=10"
    ar_args="$tiny --max_iters=20"
    bench_args="--device=cpu --data_dir=$MODELS/data --draft_lens=2,4 --num_prompts=2 --batches=1,2 --prompt_len=8
                --max_new_tokens=8 --max_queries=32 --repeats=2 --train_batch=2"
    limits=(120 120 60 60 60 60 120)
    budget=600
elif [ "$device" != cpu ]; then  # sized from one H100's figures: a TiDAR step 62 ms with dense attention
    train_args=""  # 4000 AR steps, then 2000 TiDAR steps
    ar_args="--max_iters=8000"  # the same time if a TiDAR step costs two AR steps, as FlexAttention should make it
    bench_args="--num_prompts=8"
    limits=(90 300 40 25 60 60 240)
    budget=540
else  # a CPU: the quick start's CPU preset and bench.py's defaults, as RESULTS.md measured them
    train_args=""  # 3800 AR steps, then 1400 TiDAR steps
    ar_args="--max_iters=7500"  # the same time: an AR step costs about 0.37 of a TiDAR step there
    bench_args=""
    limits=(300 1500 600 600 900 300 1500)
    budget=7200
fi
[ -n "${LIMITS:-}" ] && read -r -a limits <<< "$LIMITS"

rows=()  # summary.md's table, a row per phase
failed=0
summarize() {
    {
        echo "# bash experiments/reproduce.sh$([ $smoke = 1 ] && echo " --smoke"): $device, torch $torch_version," \
             "$(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "| phase | status | seconds | command |"
        echo "|---|---|---|---|"
        printf '%s\n' "${rows[@]}"
        for log in "$OUT"/*.log; do
            echo
            echo "## ${log##*/}"
            echo '```'
            case $log in
                */b-train.log|*/e-ar-baseline.log) grep -E "^(no GPU|starting|tidar model|ar model|eval|done|train.py)" "$log" ;;
                */a-gpu-tests.log) grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed|skipped" "$log" | tail -n 12 ;;
                *) cat "$log" ;;
            esac
            echo '```'
        done
    } > "$OUT/summary.md"
}
start=$(date +%s)
phase() {  # phase NAME LIMIT COMMAND...: Ctrl-C at the limit (train.py then keeps its last checkpoint)
    local name=$1 limit=$2 t0 rc result left command="${*:3}"
    shift 2
    left=$((budget - ($(date +%s) - start)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$left" -lt 20 ]; then
        rows+=("| $name | skipped: the time budget is spent | 0 | \`${command//$PY/python}\` |")
        failed=1
        summarize
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    t0=$(date +%s)
    timeout -s INT -k 30 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    result="ok"
    if [ $rc = 124 ]; then result="ran out of time"; elif [ $rc != 0 ]; then result="failed (exit status $rc)"; fi
    [ $rc != 0 ] && failed=1
    rows+=("| $name | $result | $(($(date +%s) - t0)) | \`${command//$PY/python}\` |")
    summarize
    tail -n 2 "$OUT/$name.log"
}

phase a-gpu-tests "${limits[0]}" "$PY" -m pytest tests -k test_cuda -v -p no:cacheprovider
eager="" compile=""
if grep -q "test_cuda_replays_equal_eager_steps FAILED" "$OUT/a-gpu-tests.log"; then
    eager="--eager"
    rows+=("| (a) | the captured decode step failed: bench.py decodes with --eager | | |")
fi
if grep -q "test_cuda_compiled_flex_training_equals_dense FAILED" "$OUT/a-gpu-tests.log"; then
    compile="--compile=False"
    rows+=("| (a) | compiled FlexAttention failed: train.py runs with --compile=False | | |")
fi

phase b-train "${limits[1]}" "$PY" train.py --out_dir="$MODELS/tidar" --overwrite=True $train_args $compile

if [ -f "$MODELS/tidar/ckpt.pt" ]; then  # the model of b, or its last checkpoint if b ran out of time
    bench="$PY experiments/bench.py --out_dir=$MODELS/tidar $bench_args $eager"
    phase c1-bench-val "${limits[2]}" $bench --sections=1
    phase c2-bench-outside "${limits[3]}" $bench --sections=1 --prompts="$outside"
    phase c3-bench-sweeps "${limits[4]}" $bench --sections=2,3
    phase d-bench-training "${limits[5]}" $bench --sections=4
else
    rows+=("| c, d | skipped: b left no checkpoint | 0 | bench.py |")
    failed=1
fi

phase e-ar-baseline "${limits[6]}" "$PY" train.py --objective=ar --out_dir="$MODELS/ar" --overwrite=True $ar_args \
    $compile
summarize
echo "reproduce.sh: $([ $failed = 0 ] && echo "every phase ran" || echo "some phases failed"); see $OUT/summary.md"
exit $failed
