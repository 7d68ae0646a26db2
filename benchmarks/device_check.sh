#!/usr/bin/env bash
# Every GPU check of the open issues as one bounded run on a CUDA machine (the device tool's H200):
#   1. issue 3: profile a Qwen3-8B-shaped bf16 model (random weights; LAYERS of its 36 decoder layers, default all)
#      over verify tokens 1..2048 and KV lengths up to 8k, CUDA-graph replays timed with CUDA events;
#   2. issue 3: fit the roofline parameters to that profile (held-out error included);
#   3. the same grid timed eager (no --cuda-graph): what Python's kernel launches add;
#   4. issue 5: the tests that run on CUDA (the paged KV cache and packed forward against the plain one; graph
#      against eager timing);
#   5. issue 5: the engine benchmark on CUDA (batch-1 speedup and tokens/s against batch size, side by side); it
#      checks that every policy emits the same greedy tokens (lossless on the device). ENGINE=0 skips it.
#
#   bash benchmarks/device_check.sh OUTDIR   # each step has a time limit: 8 minutes at most in all (6 with
#                                            # ENGINE=0). Its first version (8 layers, eager only, 60 points)
#                                            # took 80 s on the H200 (2026-12-04); this one has not run there yet
#
# Each step writes its log and results to OUTDIR and the script goes on after a failure. Nothing is installed or
# downloaded: these steps need torch, numpy, scipy, pandas and safetensors, which the device image has (simpy,
# only the simulator's, is not needed). A dry run on the CPU with a small model:
#   DEVICE=cpu DTYPE=float32 MODEL=echo_exec/models/tiny-target TOKENS=1,16 KV=0,256 LAYERS=2 \
#     ENGINE_ARGS="--prompts 2 --batch-sizes 1,2 --gen-len 32 --calibration-prompts 2" bash benchmarks/device_check.sh /tmp/dc
set -u
out=${1:?usage: bash benchmarks/device_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODEL=${MODEL:-qwen3-8b}
LAYERS=${LAYERS:-36}
TOKENS=${TOKENS:-1,2,3,4,6,8,12,16,24,32,48,64,96,128,192,256,384,512,768,1024,1536,2048}
KV=${KV:-0,1024,2048,4096,8192}
HARDWARE=${HARDWARE:-h200}
ENGINE_ARGS=${ENGINE_ARGS:---prompts 8 --batch-sizes 1,4,16,32,64}
ENGINE=${ENGINE:-1}
echosim="python3 -m echosim.cli"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, report the exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}

{ nvidia-smi 2>&1 || true; python3 -c "import torch, numpy, sys; print(sys.version); print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-');
print('numpy', numpy.__version__)"; } >"$out/env.txt" 2>&1

graph=--cuda-graph
[ "$DEVICE" = cpu ] && graph=
step profile 150 $echosim profile --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --num-layers "$LAYERS" \
    --batch-sizes 1 --tokens-per-seq "$TOKENS" --kv-lens "$KV" --warmup 3 --repeats 10 --rounds 2 $graph \
    --out "$out/${HARDWARE}_profile.csv"
step fit 45 $echosim fit --profiles "$out/${HARDWARE}_profile.csv" --hardware "$HARDWARE" \
    --out "$out/${HARDWARE}_fit.json"
if [ -n "$graph" ]; then
    step profile_eager 100 $echosim profile --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
        --num-layers "$LAYERS" --batch-sizes 1 --tokens-per-seq "$TOKENS" --kv-lens "$KV" --warmup 3 --repeats 5 \
        --out "$out/${HARDWARE}_profile_eager.csv"
fi
step cuda_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_model_cache.py tests/test_cost_profiler.py -k cuda
if [ "$ENGINE" != 0 ]; then
    step engine 120 python3 benchmarks/bench_engine.py --device "$DEVICE" $ENGINE_ARGS --out "$out/engine.json"
fi
cat "$out/steps.txt"
