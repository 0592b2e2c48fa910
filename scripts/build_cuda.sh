#!/usr/bin/env bash
# Build build/libneod_cuda.so from cuda/*.cu with nvcc.
#
# Targets sm_90a machine code (H100/H200) plus compute_80 PTX, which the driver compiles for any
# other GPU from Ampere on. Each source compiles to its own object in parallel; an object is rebuilt
# only when the hash of its source, the headers, the flags or the compiler changes, so a second run
# with nothing changed returns at once. Environment: NVCC (compiler), NEOD_CUDA_ARCH_FLAGS
# (replaces the target list), NEOD_BUILD_JOBS (parallel compiles).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src_dir="$root/cuda"
out_dir="$root/build"
obj_dir="$out_dir/cuda_obj"
lib="$out_dir/libneod_cuda.so"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    echo "build_cuda.sh: nvcc not found (set NVCC or install the CUDA toolkit)" >&2
    exit 1
  fi
fi

arch_flags="${NEOD_CUDA_ARCH_FLAGS:--gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80}"
flags="-O3 -std=c++17 --use_fast_math -Xcompiler=-fPIC,-fvisibility=hidden -Xptxas=-warn-spills -lineinfo $arch_flags"
jobs="${NEOD_BUILD_JOBS:-$(nproc)}"

mkdir -p "$obj_dir"
compiler_id="$("$nvcc" --version | tail -n 1)"
headers_hash="$(cat "$src_dir"/*.h "$src_dir"/*.cuh | sha256sum | cut -d' ' -f1)"

stale=()
objects=()
for cu in "$src_dir"/*.cu; do
  name="$(basename "$cu" .cu)"
  obj="$obj_dir/$name.o"
  objects+=("$obj")
  stamp="$( (cat "$cu"; echo "$headers_hash $flags $compiler_id") | sha256sum | cut -d' ' -f1)"
  if [[ ! -f "$obj" || "$(cat "$obj.stamp" 2>/dev/null)" != "$stamp" ]]; then
    stale+=("$cu:$obj:$stamp")
  fi
done

if ((${#stale[@]} > 0)); then
  echo "build_cuda.sh: compiling ${#stale[@]} source(s) with $jobs job(s)"
  export nvcc flags src_dir
  printf '%s\n' "${stale[@]}" | xargs -P "$jobs" -I{} bash -c '
    IFS=: read -r cu obj stamp <<<"{}"
    rm -f "$obj.stamp"
    # shellcheck disable=SC2086
    "$nvcc" $flags -I"$src_dir" -c "$cu" -o "$obj"
    echo "$stamp" >"$obj.stamp"
  '
fi

newest_obj="$(ls -t "${objects[@]}" | head -n 1)"
if ((${#stale[@]} > 0)) || [[ ! -f "$lib" || "$newest_obj" -nt "$lib" ]]; then
  # shellcheck disable=SC2086
  "$nvcc" $arch_flags -shared -cudart static "${objects[@]}" -o "$lib.tmp"
  mv -f "$lib.tmp" "$lib"
  echo "build_cuda.sh: built $lib"
else
  echo "build_cuda.sh: $lib is up to date"
fi
