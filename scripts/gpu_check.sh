#!/usr/bin/env bash
# Every GPU target of docs/benchmarks.md ("Targets") in one run of under 10 minutes, on an NVIDIA GPU.
#   bash scripts/gpu_check.sh [output dir]     (default: gpu-check/)
# Each step has its own time limit and log in the output dir, so a slow or failing step leaves the
# others' results in place; the benchmark also logs each group's rows as soon as they are measured.
# What each step measures (sd-v1 at 512 px):
#   tests.txt          a steady-state training step makes no host sync (32, 16-mixed, bf16-mixed, with and
#                      without the face loss); CUDA-graph compiled UNet = eager; CUDA parity and training
#   bench_fp16.txt     TI step b1/b8 against diffusers' fp16-weight recipe (time <= 0.5x, peak memory
#                      <= 0.6x), face step <= 1.3x, DreamBooth step <= 0.8x train_dreambooth, prompt to
#                      image (50 DDIM steps, CFG 7.5, b1) against StableDiffusionPipeline fp16
#   bench_bf16.txt     TI step b8 in bf16: share of the card's dense bf16 peak (>= 30%)
#   bench_compiled.txt TI step b1 with --compile_unet (CUDA graphs) against the recipe eager and with
#                      torch.compile (<= 0.8x), and compiled sampling against the eager pipeline (<= 0.6x)
# Figures go into docs/benchmarks.md by hand, with the card's name.
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

bench=("$python" scripts/benchmark.py --config sd-v1 --device cuda --repeats 5 --markdown)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
step 100 tests.txt "$python" -m pytest tests/test_cuda_speed.py tests/test_cuda.py -q -p no:cacheprovider
step 170 bench_fp16.txt "${bench[@]}" --precision fp16 --ti-batches 1 8 --only unet vae sample ti face dreambooth
step 60 bench_bf16.txt "${bench[@]}" --precision bf16 --ti-batches 8 --only ti
step 240 bench_compiled.txt "${bench[@]}" --precision fp16 --ti-batches 1 --only compiled
