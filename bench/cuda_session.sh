#!/usr/bin/env bash
# What one call on a lent GPU host runs (its own python3, torch and Triton; no network):
#   bash bench/cuda_session.sh check   # the CUDA tests, the LoRA tuning and kernel benches, quick serving runs (1, 8, 64 adapters) on Llama-8B shapes
#   bash bench/cuda_session.sh verify  # the same without the tuner (its table stands): after a change to the engine or kernels
#   bash bench/cuda_session.sh kernels # the CUDA tests and the kernel bench alone
#   bash bench/cuda_session.sh quick   # the quick serving runs alone, with decode graphs and eager (every op launched)
#   bash bench/cuda_session.sh serve   # the whole serving bench on Llama-8B shapes (1..2048 adapters, Zipf, peft)
# Each step has its own time limit and a failing one does not stop the next. Logs and the
# bench results (bench/results/*cuda*) come back as a few files under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-/tmp/tandem-cuda}
mkdir -p "$out"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s"
}

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import sys, torch, triton, transformers, peft; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())" >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

mode=${1:-check}
case "$mode" in
check | verify)  # check at most 530 s (verify 400 s, no tuning): one call inside the 15 minutes of device time, with the machine's start
    # eight workers: the kernel tests spend most of their time compiling Triton kernels on the CPU
    # (tests needing the SmolLM2 file, absent there, cannot run: test_slots' CUDA tests among them)
    step tests 100 python3 -m pytest -q -p no:cacheprovider --timeout 90 -n 8 --durations 15 tests/kernels tests/engine/test_cuda.py
    [ "$mode" = check ] && step tune_8b 130 python3 bench/lora_tune.py --model llama-8b
    step kernels_8b 100 python3 bench/lora_kernels.py --model llama-8b
    step serving_8b 200 python3 bench/lora_serving.py --model llama-8b --quick --threads 8
    ;;
kernels)  # the CUDA tests and the kernel bench alone, Llama-8B and Llama-1B shapes (~200 s)
    step tests 100 python3 -m pytest -q -p no:cacheprovider --timeout 90 -n 8 --durations 15 tests/kernels tests/engine/test_cuda.py
    step kernels_8b 100 python3 bench/lora_kernels.py --model llama-8b
    step kernels_1b 60 python3 bench/lora_kernels.py --model llama-1b
    ;;
quick)
    step serving_8b 200 python3 bench/lora_serving.py --model llama-8b --quick --threads 8
    step serving_8b_eager 120 python3 bench/lora_serving.py --model llama-8b --quick --threads 8 --eager
    ;;
serve)  # the whole serving bench (1..2048 adapters, Zipf, peft): for a session with more device time
    step serving_8b_full 540 python3 bench/lora_serving.py --model llama-8b --threads 8
    ;;
esac
tar czf "$out/results.tgz" bench/results/*cuda* tandem/kernels/lora/tuned 2>/dev/null
for log in "$out"/*.log; do
    echo "---- $(basename "$log")"
    tail -n 25 "$log"
done
