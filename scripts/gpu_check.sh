#!/usr/bin/env bash
# Validates and times neod on a GPU host that has torch and a compiler but no ispc and no network
# (the prebuilt build/ispc objects and build/libneod_cuda.so travel with the tree; docs/build.md).
# Usage: scripts/gpu_check.sh OUTDIR [tests] [step] [cpu] [amx] [kvmem] [program]
#        [program-ab REV] [pipeline] [throughput ARGS...]
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [tests] [step] [cpu] [amx] [kvmem] [program] [program-ab REV] [pipeline] [throughput ARGS...]}
shift
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$out"
# Python packages the GPU image lacks (orjson: the engine tests import it) travel as wheels in
# .whl/ (docs/build.md says how to fetch them).
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/neod-site .whl/*.whl || exit 1
    export PYTHONPATH=$PWD:/tmp/neod-site
fi
if ! NEOD_ISPC_OBJECTS=build/ispc python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1; then
    tail -30 "$out/build.log"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "from neod.cython import load_native; print('AMX:', load_native().AMX_SUPPORTED)" | tee -a "$out/gpu.txt"
echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)" | tee -a "$out/gpu.txt"
while [ $# -gt 0 ]; do
    what=$1
    shift
    case $what in
        tests)
            python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_engine_gpu.py \
                tests/test_cpu_attention.py tests/test_cpu_layers.py 2>&1 | tee "$out/tests.log" | tail -15 ;;
        step)
            python3 -m neod.bench.engine_step --preset llama-3.1-8b 2>&1 | tee "$out/engine_step.txt" ;;
        cpu)
            python3 -m neod.bench.cpu_attention --threads 1,4,8,12,15,16 --batch 1,16,64 \
                --context 1024,4096,16384 --max-kv-gib 1 --seconds 0.3 --torch-at 16 \
                --reserve-cores 0 --out "$out/cpu_attention.json" 2>&1 | tee "$out/cpu_attention.txt" ;;
        amx)  # the tile products' paths side by side on the GQA-8 shape of Llama-3.1-8B/70B
            python3 -m neod.bench.cpu_attention --batch 16,64 --context 1024,4096 --threads 1,14 \
                --q-heads 64 --kv-heads 8 --head-dim 128 --no-torch --seconds 0.3 \
                --reserve-cores 1 --out "$out/amx.json" 2>&1 | tee "$out/amx.txt" ;;
        kvmem)  # the same kernel on plain and on CUDA-pinned host memory (the engine's pool)
            python3 -m neod.bench.cpu_attention --batch 8,16,64 --context 1024,4096 --threads 14 \
                --q-heads 64 --kv-heads 8 --head-dim 128 --no-torch --seconds 0.3 \
                --reserve-cores 1 --products amx,amx-scores --kv-memory pageable,pinned \
                --out "$out/kvmem.json" 2>&1 | tee "$out/kvmem.txt" ;;
        program)  # the engine's CPU program at the 8B/70B sub-batch sizes, every layer ready
            # and with its steps released one at a time (as a GPU-paced iteration)
            python3 -m neod.bench.cpu_program --batch 1,3,4,8,16 --context 16,1100 --paced \
                --out "$out/program.json" 2>&1 | tee "$out/program.txt" ;;
        program-ab)  # the paced CPU program against the native build of the next argument, a
            # revision exported with scripts/native_ab.sh; two rounds, the trees alternating
            rev=${1:?program-ab needs a revision exported with scripts/native_ab.sh}
            shift
            scripts/native_ab.sh build "$rev" >/dev/null || exit 1
            for round in 1 2; do
                for tree in "$PWD" "/tmp/ab-$rev"; do
                    echo "== $tree, round $round" | tee -a "$out/program-ab.txt"
                    (cd "$tree" && PYTHONPATH=$tree:/tmp/neod-site python3 -m neod.bench.cpu_program \
                        --batch 1,2,3,4,8,16 --context 1100 --paced --probe-bytes $((1 << 29)) \
                        2>&1) | tee -a "$out/program-ab.txt"
                done
            done ;;
        pipeline)  # one iteration of G GPU and K CPU decodes, each mode, measured and predicted
            python3 -m neod.bench.pipeline --preset llama-3.1-8b --gpu-decodes 4 \
                --cpu-decodes 0,1,2,4,8,16 --context 1100 --repeats 5 2>&1 \
                | tee "$out/pipeline.log" | grep -v " INFO " | tee "$out/pipeline.txt" ;;
        throughput)
            python3 -m neod.bench.throughput "$@" 2>&1 | tee -a "$out/throughput.log" \
                | grep -v " INFO " | tee -a "$out/throughput.txt"
            # The profiles the run used: with a --trace-out file they let the CPU correction be
            # replayed offline (the trace has each iteration's CPU sub-batches and times).
            profiles=$(python3 -c "from neod.config import load_config, profile_dir
print(profile_dir(load_config(None)))")
            cp "$profiles"/profile-*.json "$out/" 2>/dev/null
            break ;;
        *) echo "unknown step $what" >&2; exit 2 ;;
    esac
done
