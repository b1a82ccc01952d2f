#!/usr/bin/env bash
# CUDA tests and the GPU benchmark in one go, on a machine with an NVIDIA GPU.
#   bash scripts/gpu_check.sh [output dir]     (default: gpu-check/)
# Each step has its own time limit and writes its log to the output dir, so a slow or failing step
# leaves the others' results in place. Figures go into docs/benchmarks.md by hand, with the card's name.
set -u
out="${1:-gpu-check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {  # step <seconds> <log name> <command...>
    local limit="$1" log="$out/$2"
    shift 2
    echo "== $* (limit ${limit}s)" | tee "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== exit $?" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
step 110 bench_sd_fp32.txt "$python" scripts/benchmark.py --config sd-v1 --device cuda --repeats 5 \
    --only unet vae ddim ti ti_parts face dreambooth --markdown
step 70 bench_sd_fp16.txt "$python" scripts/benchmark.py --config sd-v1 --device cuda --precision fp16 --repeats 5 \
    --only unet vae ddim ti ti_parts face --markdown
step 35 bench_tiny.txt "$python" scripts/benchmark.py --config tiny --device cuda --repeats 5 \
    --only unet vae ddim ti ti_parts face dreambooth --markdown
step 110 tests.txt "$python" -m pytest tests/test_cuda.py tests/test_activation_memory.py tests/test_training_cli.py -q -p no:cacheprovider
