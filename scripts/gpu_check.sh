#!/usr/bin/env bash
# Every GPU target of docs/benchmarks.md ("Targets"), on an NVIDIA GPU, in steps that each have a time limit and a log:
#   bash scripts/gpu_check.sh [output dir] [step ...]     (default: gpu-check/, all four steps)
# A slow or failing step leaves the others' results in place; the benchmark logs each group's rows as soon as they
# are measured. Limits as seen on an H200 (2026-12-04): fp16 + bf16 take 3.5 minutes, the tests and the compiled
# group compile the UNet (about 90 s each time), so all four steps do not fit one 10-minute device call: run
# `fp16 bf16 tests` in one call and `compiled` in the next.
# What each step measures (sd-v1 at 512 px):
#   tests     tests.txt          a steady-state training step makes no host sync (32, 16-mixed, bf16-mixed, with and
#                                without the face loss); CUDA-graph compiled UNet = eager; CUDA parity and training
#   fp16      bench_fp16.txt     TI step b1/b8 against diffusers' fp16-weight recipe (time <= 0.5x, peak memory
#                                <= 0.6x), face step <= 1.3x, DreamBooth step <= 0.8x train_dreambooth, prompt to
#                                image (50 DDIM steps, CFG 7.5, b1) against StableDiffusionPipeline fp16
#   bf16      bench_bf16.txt     TI step b8 in bf16: share of the card's dense bf16 peak (>= 30%)
#   compiled  bench_compiled.txt TI step b1 with --compile_unet (CUDA graphs) against the recipe eager and with
#                                torch.compile (<= 0.8x), and compiled sampling against the eager pipeline (<= 0.6x)
# Figures go into docs/benchmarks.md by hand, with the card's name.
set -u
out="${1:-gpu-check}"
shift $(( $# > 0 ? 1 : 0 ))
all_steps="tests fp16 bf16 compiled"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || read -ra steps <<<"$all_steps"
for s in "${steps[@]}"; do
    if [[ " $all_steps " != *" $s "* ]]; then
        echo "gpu_check.sh: unknown step '$s'; the steps are: $all_steps" >&2
        exit 2
    fi
done
mkdir -p "$out"
python="${PYTHON:-python3}"
# the repository's root on the path, so that scripts/ find ldm where the project is not pip-installed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

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
wants() { [[ " ${steps[*]} " == *" $1 "* ]]; }
wants tests && step 240 tests.txt "$python" -m pytest tests/test_cuda_speed.py tests/test_cuda.py -q -p no:cacheprovider
wants fp16 && step 170 bench_fp16.txt "${bench[@]}" --precision fp16 --ti-batches 1 8 --only unet vae sample ti face dreambooth
wants bf16 && step 60 bench_bf16.txt "${bench[@]}" --precision bf16 --ti-batches 8 --only ti
wants compiled && step 420 bench_compiled.txt "${bench[@]}" --precision fp16 --ti-batches 1 --only compiled
exit 0
