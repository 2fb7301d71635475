#!/usr/bin/env bash
# What one call on a lent GPU host runs (its own python3, torch and Triton; no network):
#   bash bench/cuda_session.sh check   # the CUDA tests, the LoRA tuning and kernel benches, quick serving runs (1, 8, 64 adapters) on Llama-8B shapes
#   bash bench/cuda_session.sh verify  # the same without the tuner (its table stands): after a change to the engine or kernels
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
check | verify)  # check at most 500 s (verify 370 s, no tuning): one call inside the 15 minutes of device time, with the machine's start
    # eight workers: the kernel tests spend most of their time compiling Triton kernels on the CPU
    step tests 100 python3 -m pytest -q -p no:cacheprovider --timeout 90 -n 8 --durations 15 tests/kernels tests/engine/test_cuda.py \
        "tests/adapters/test_slots.py::test_a_load_stages_an_adapters_tensors_in_one_copy[cuda]" \
        tests/adapters/test_slots.py::test_cuda_prefetch_copies_on_a_side_stream_and_acquire_waits_for_it \
        tests/adapters/test_slots.py::test_cuda_prefetch_holds_the_adapter_until_its_copy_has_read_it \
        tests/adapters/test_slots.py::test_on_cuda_new_adapters_take_empty_slots_then_the_least_recently_used
    [ "$mode" = check ] && step tune_8b 130 python3 bench/lora_tune.py --model llama-8b
    step kernels_8b 70 python3 bench/lora_kernels.py --model llama-8b
    step serving_8b 200 python3 bench/lora_serving.py --model llama-8b --quick --threads 8
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
