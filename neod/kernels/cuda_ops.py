"""ctypes binding of build/libneod_cuda.so, the CUDA C++ kernels.

The library exposes a C ABI (cuda/neod_cuda.h): raw pointers, sizes, a dtype code and a
cudaStream_t in, a status code out. This module checks shapes, dtypes, devices and strides in
Python (cheap attribute reads only: these calls are on the hot path), passes `data_ptr()`s and the
current stream, and turns a failed status into CudaKernelError. ctypes releases the GIL for the
duration of each call, which is only the launch.

The library path is NEOD_CUDA_LIB if set, else build/libneod_cuda.so at the repository root
(scripts/build_cuda.sh builds it).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ABI_VERSION = 4
LIB_ENV = "NEOD_CUDA_LIB"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_HALF_DTYPES = (torch.float16, torch.bfloat16)
DECODE_HEAD_DIMS = (64, 128)
DECODE_BLOCK_SIZES = (16, 32)
SWAP_METHODS = {"memcpy": 0, "kernel": 1}

# C signatures as "<result>:<arguments>", one letter per type: p pointer, l int64, i int,
# u uint32, f float, s char*. They must match cuda/neod_cuda.h.
_CTYPES = {"p": ctypes.c_void_p, "l": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float,
           "s": ctypes.c_char_p, "u": ctypes.c_uint32}  # fmt: skip
_SIGNATURES = {
    "neod_abi_version": "i:",
    "neod_cuda_error_string": "s:i",
    "neod_fused_add_rms_norm": "i:plplpillfip",
    "neod_rms_norm": "i:plplpillfip",
    "neod_rotary_embedding": "i:pplplpllllip",
    "neod_silu_and_mul": "i:pplllip",
    "neod_store_kv": "i:plplppllllip",
    "neod_load_kv": "i:plplppllllip",
    "neod_paged_decode_max_splits": "i:lllll",
    "neod_paged_decode_workspace_bytes": "l:llll",
    "neod_paged_decode_attention": "i:plplpplplllllflplip",
    "neod_swap_blocks": "i:plpllplplip",
    "neod_stream_write_flag": "i:pup",
    "neod_stream_wait_flag": "i:pup",
    "neod_event_create": "i:p",
    "neod_event_destroy": "i:p",
    "neod_stream_wait_event": "i:pp",
    "neod_handoff": "i:ppppuplplllppu",
}


class CudaKernelError(RuntimeError):
    """A CUDA kernel launcher rejected its arguments or its launch failed."""


def library_path() -> Path:
    """Where the library is loaded from: NEOD_CUDA_LIB, else <repo>/build/libneod_cuda.so."""
    override = os.environ.get(LIB_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "build" / "libneod_cuda.so"


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = library_path()
    if not path.is_file():
        logger.info(
            "CUDA kernel library not found at %s; CUDA tensors use the torch reference", path
        )
        return None
    lib = ctypes.CDLL(str(path))
    for name, signature in _SIGNATURES.items():
        result, args = signature.split(":")
        fn = getattr(lib, name)
        fn.restype = _CTYPES[result]
        fn.argtypes = [_CTYPES[c] for c in args]
    version = lib.neod_abi_version()
    if version != ABI_VERSION:
        raise CudaKernelError(
            f"{path} has ABI version {version}, this package needs {ABI_VERSION}: "
            "rebuild it with scripts/build_cuda.sh"
        )
    logger.info("loaded CUDA kernel library %s", path)
    return lib


def available() -> bool:
    """True when a GPU is visible and the kernel library is loaded."""
    return torch.cuda.is_available() and _library() is not None


def loaded() -> bool:
    """True when the kernel library is loaded (cheap after the first call: the hot-path test)."""
    return _library() is not None


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise CudaKernelError(
            f"CUDA kernel library not found at {library_path()}: run scripts/build_cuda.sh "
            f"or set {LIB_ENV}"
        )
    return lib


def _call(op: str, fn: str, *args: object) -> None:
    """Run one launcher and raise CudaKernelError with its status text if it fails."""
    lib = _lib()
    status = getattr(lib, fn)(*args)
    if status != 0:
        text = lib.neod_cuda_error_string(status).decode()
        raise CudaKernelError(f"{op} failed: {text} (status {status})")


def _stream(device: torch.device) -> int:
    # The current cudaStream_t without building a torch.cuda.Stream object (a few us per call).
    return torch._C._cuda_getCurrentRawStream(device.index)


def _dtype_code(t: torch.Tensor, op: str) -> int:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise CudaKernelError(f"{op}: unsupported dtype {t.dtype}")
    return code


def _require(cond: bool, op: str, what: str) -> None:
    if not cond:
        raise CudaKernelError(f"{op}: {what}")


def _is_rows(t: torch.Tensor) -> bool:
    """A 2-D CUDA tensor whose rows are contiguous (any row stride)."""
    return t.is_cuda and t.dim() == 2 and t.stride(1) == 1


def _is_heads(t: torch.Tensor) -> bool:
    """A [T, H, D] CUDA tensor whose heads are contiguous (any token stride)."""
    return t.is_cuda and t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def _is_vector(t: torch.Tensor, dtype: torch.dtype, length: int) -> bool:
    return t.is_cuda and t.dtype == dtype and t.shape == (length,) and t.is_contiguous()


def _is_kv_layer(kv_layer: torch.Tensor) -> bool:
    # [num_blocks, 2, Hkv, block_size, D]
    return kv_layer.is_cuda and kv_layer.dim() == 5 and kv_layer.is_contiguous()


def _weight_code(weight: torch.Tensor, x: torch.Tensor, op: str) -> int:
    ok = weight.shape == (x.shape[1],) and weight.is_contiguous() and weight.is_cuda
    ok = ok and weight.dtype in (x.dtype, torch.float32)
    _require(ok, op, "weight must be contiguous [H] of x's dtype or fp32")
    return _DTYPE_CODES[weight.dtype]


def fused_add_rms_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual += x; x = rmsnorm(residual) * weight`."""
    # x, residual: [T, H]; weight: [H]
    op = "fused_add_rms_norm_"
    ok = _is_rows(x) and _is_rows(residual) and residual.shape == x.shape
    _require(ok and residual.dtype == x.dtype, op, "x and residual must be alike [T, H] rows")
    code = _weight_code(weight, x, op)
    _call(op, "neod_fused_add_rms_norm", x.data_ptr(), x.stride(0), residual.data_ptr(),
          residual.stride(0), weight.data_ptr(), code, x.shape[0], x.shape[1], eps,
          _dtype_code(x, op), _stream(x.device))  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rmsnorm(x) * weight` into a new tensor."""
    # x: [T, H]; weight: [H] -> [T, H]
    op = "rms_norm"
    _require(_is_rows(x), op, "x must be a [T, H] CUDA tensor with contiguous rows")
    code = _weight_code(weight, x, op)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _call(op, "neod_rms_norm", out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0),
          weight.data_ptr(), code, x.shape[0], x.shape[1], eps, _dtype_code(x, op),
          _stream(x.device))  # fmt: skip
    return out


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate-half RoPE on q and k in place."""
    # positions: [T] int64; q: [T, Hq, D]; k: [T, Hkv, D]; cos_sin: [max_pos, D] fp32
    op = "rotary_embedding_"
    num_tokens, num_q_heads, head_dim = q.shape
    ok = _is_heads(q) and _is_heads(k) and k.dtype == q.dtype
    ok = ok and k.shape[0] == num_tokens and k.shape[2] == head_dim
    _require(ok, op, "q and k must be [T, H, D] of one dtype with contiguous heads")
    _require(_is_vector(positions, torch.int64, num_tokens), op, "positions must be int64 [T]")
    ok = cos_sin.is_cuda and cos_sin.dtype == torch.float32 and cos_sin.is_contiguous()
    ok = ok and cos_sin.dim() == 2 and cos_sin.shape[1] == head_dim
    _require(ok, op, "cos_sin must be contiguous fp32 [max_pos, D]")
    _call(op, "neod_rotary_embedding", positions.data_ptr(), q.data_ptr(), q.stride(0),
          k.data_ptr(), k.stride(0), cos_sin.data_ptr(), num_tokens, num_q_heads, k.shape[1],
          head_dim, _dtype_code(q, op), _stream(q.device))  # fmt: skip


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [gate | up]."""
    # x: [T, 2I] -> [T, I]
    op = "silu_and_mul"
    ok = _is_rows(x) and x.shape[1] % 2 == 0
    _require(ok, op, "x must be a [T, 2I] CUDA tensor with contiguous rows")
    inter = x.shape[1] // 2
    out = torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device)
    _call(op, "neod_silu_and_mul", out.data_ptr(), x.data_ptr(), x.stride(0), x.shape[0], inter,
          _dtype_code(x, op), _stream(x.device))  # fmt: skip
    return out


def store_kv_(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_ids: torch.Tensor
) -> None:
    """Write each token's K/V into its slot; slot -1 is skipped."""
    # k, v: [T, Hkv, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64
    op = "store_kv_"
    _require(_is_kv_layer(kv_layer), op, "kv_layer must be a contiguous 5-D CUDA tensor")
    _kv_rows(op, "neod_store_kv", kv_layer, slot_ids, k, v)


def load_kv_(
    kv_layer: torch.Tensor, slot_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """The inverse of store_kv_: each row of k and v gets its slot's K/V; slot -1 is skipped. The
    layer may be a pinned host pool's, read over the bus without a copy through the CPU."""
    # kv_layer: [num_blocks, 2, Hkv, block_size, D]; slot_ids: [T] int64; k, v: [T, Hkv, D]
    op = "load_kv_"
    ok = kv_layer.dim() == 5 and kv_layer.is_contiguous()
    _require(ok and (kv_layer.is_cuda or kv_layer.is_pinned()), op,
             "kv_layer must be a contiguous 5-D CUDA or pinned host tensor")  # fmt: skip
    _kv_rows(op, "neod_load_kv", kv_layer, slot_ids, k, v)


def _kv_rows(
    op: str, fn: str, kv_layer: torch.Tensor, slot_ids: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Checks the rows and slots of a store or load, then calls it on k's device's stream."""
    _, _, num_kv_heads, block_size, head_dim = kv_layer.shape
    ok = _is_heads(k) and _is_heads(v) and k.shape == v.shape
    ok = ok and k.shape[1:] == (num_kv_heads, head_dim) and k.dtype == v.dtype == kv_layer.dtype
    _require(ok, op, f"k and v must be [T, {num_kv_heads}, {head_dim}] with contiguous heads")
    _require(_is_vector(slot_ids, torch.int64, k.shape[0]), op, "slot_ids must be int64 [T]")
    _call(op, fn, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), kv_layer.data_ptr(),
          slot_ids.data_ptr(), k.shape[0], num_kv_heads, head_dim, block_size,
          _dtype_code(kv_layer, op), _stream(k.device))  # fmt: skip


def decode_supported(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """Whether a compiled decode-attention specialization covers this dtype and shape."""
    return (
        q.dtype in _HALF_DTYPES
        and kv_layer.dim() == 5
        and kv_layer.shape[4] in DECODE_HEAD_DIMS
        and kv_layer.shape[3] in DECODE_BLOCK_SIZES
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _max_splits(batch: int, num_q_heads: int, num_kv_heads: int, max_len: int, sms: int) -> int:
    return _lib().neod_paged_decode_max_splits(batch, num_q_heads, num_kv_heads, max_len, sms)


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache; splits long contexts when the batch is small."""
    # q: [B, Hq, D]; kv_layer: [num_blocks, 2, Hkv, block_size, D]; block_tables: [B, max_blocks]
    # int32; seq_lens: [B] int32 -> [B, Hq, D] in q's dtype
    op = "paged_decode_attention"
    _require(_is_kv_layer(kv_layer), op, "kv_layer must be a contiguous 5-D CUDA tensor")
    _, _, num_kv_heads, block_size, head_dim = kv_layer.shape
    batch, num_q_heads = q.shape[0], q.shape[1]
    ok = _is_heads(q) and q.shape[2] == head_dim and q.dtype == kv_layer.dtype
    ok = ok and num_q_heads % num_kv_heads == 0
    _require(ok, op, f"q must be [B, Hq, {head_dim}] in the cache's dtype, heads contiguous")
    ok = block_tables.is_cuda and block_tables.dtype == torch.int32 and block_tables.dim() == 2
    ok = ok and block_tables.shape[0] == batch and block_tables.stride(1) == 1
    _require(ok, op, "block_tables must be int32 [B, max_blocks] with contiguous rows")
    _require(_is_vector(seq_lens, torch.int32, batch), op, "seq_lens must be int32 [B]")
    if out is None:
        out = torch.empty_like(q)
    else:
        ok = out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
        _require(ok and _is_heads(out), op, "out must match q and have contiguous heads")
    if batch == 0:
        return out
    max_len = block_tables.shape[1] * block_size  # an upper bound: reading seq_lens would sync
    splits = _max_splits(batch, num_q_heads, num_kv_heads, max_len, _num_sms(q.device.index))
    workspace_bytes = _lib().neod_paged_decode_workspace_bytes(batch, num_q_heads, head_dim, splits)
    # split-KV partials; most batches need none, which saves an allocation on the hot path
    workspace = (
        torch.empty(workspace_bytes, dtype=torch.uint8, device=q.device) if splits > 1 else None
    )
    workspace_ptr = 0 if workspace is None else workspace.data_ptr()
    _call(op, "neod_paged_decode_attention", out.data_ptr(), out.stride(0), q.data_ptr(),
          q.stride(0), kv_layer.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
          seq_lens.data_ptr(), batch, num_q_heads, num_kv_heads, head_dim, block_size, scale,
          splits, workspace_ptr, workspace_bytes, _dtype_code(q, op),
          _stream(q.device))  # fmt: skip
    return out


def swap_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    block_pairs: torch.Tensor,
    layers: Sequence[int] | torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    method: str = "memcpy",
) -> None:
    """Copy block-layers `src_pool[l, s] -> dst_pool[l, d]` asynchronously on `stream`.

    One pool is on the GPU; the other is on the same GPU or in pinned host memory. "memcpy" uses
    the copy engines (no SM time); "kernel" copies with thread blocks over the mapped host pool.
    """
    # pools: [num_layers, num_blocks, 2, Hkv, block_size, D]; block_pairs: [n, 2] int64 (src, dst)
    op = "swap_blocks"
    ok = src_pool.dim() == 6 and src_pool.dtype == dst_pool.dtype
    ok = ok and src_pool.shape[:1] + src_pool.shape[2:] == dst_pool.shape[:1] + dst_pool.shape[2:]
    ok = ok and src_pool.is_contiguous() and dst_pool.is_contiguous()
    _require(ok, op, "pools must be contiguous and alike but for their block counts")
    gpu_pool = src_pool if src_pool.is_cuda else dst_pool
    _require(gpu_pool.is_cuda, op, "one pool must be on a GPU")
    for pool in (src_pool, dst_pool):
        _require(pool.is_cuda or pool.is_pinned(), op, "a host pool must be pinned memory")
    _require(block_pairs.dim() == 2 and block_pairs.shape[1] == 2, op, "block_pairs must be [n, 2]")
    num_layers = src_pool.shape[0]
    layer_ids = torch.arange(num_layers) if layers is None else torch.as_tensor(layers)
    if block_pairs.shape[0] == 0 or layer_ids.numel() == 0:
        return
    if not block_pairs.is_cuda:  # ids on the device are not checked: that would synchronise
        ok = bool((block_pairs >= 0).all()) and bool((layer_ids >= 0).all())
        ok = ok and bool((block_pairs[:, 0] < src_pool.shape[1]).all())
        ok = ok and bool((block_pairs[:, 1] < dst_pool.shape[1]).all())
        _require(ok and bool((layer_ids < num_layers).all()), op, "block or layer id out of range")
    method_code = SWAP_METHODS[method]
    if stream is None:
        stream = torch.cuda.current_stream(gpu_pool.device)
    src_layer_bytes = src_pool.stride(0) * src_pool.element_size()
    dst_layer_bytes = dst_pool.stride(0) * dst_pool.element_size()
    chunk_bytes = src_pool[0, 0].numel() * src_pool.element_size()
    # memcpy reads the ids on the host; the kernel reads them on the device, from tensors
    # allocated on `stream` so that the caching allocator keeps them until the kernel has run
    ids_device = torch.device("cpu") if method == "memcpy" else gpu_pool.device
    with torch.cuda.stream(stream):
        pairs = block_pairs.to(device=ids_device, dtype=torch.int64).contiguous()
        layer_ids = layer_ids.to(device=ids_device, dtype=torch.int64).contiguous()
        _call(op, "neod_swap_blocks", src_pool.data_ptr(), src_layer_bytes,
              dst_pool.data_ptr(), dst_layer_bytes, chunk_bytes, pairs.data_ptr(), pairs.shape[0],
              layer_ids.data_ptr(), layer_ids.numel(), method_code, stream.cuda_stream)  # fmt: skip


def flag_address(flags: torch.Tensor, index: int, op: str = "flag_address") -> int:
    """The host address of `flags[index]`, checked: what `handoff` takes for a flag."""
    ok = flags.dtype == torch.int32 and flags.dim() == 1 and flags.is_pinned()
    _require(ok and flags.is_contiguous(), op, "flags must be a pinned 1-d int32 tensor")
    _require(0 <= index < flags.shape[0], op, f"flag index {index} out of range")
    return flags.data_ptr() + 4 * index


def stream_write_flag(
    flags: torch.Tensor, index: int, value: int, stream: torch.cuda.Stream
) -> None:
    """`flags[index] = value` once `stream`'s earlier work is done (its host writes visible)."""
    address = flag_address(flags, index, "stream_write_flag")
    _call("stream_write_flag", "neod_stream_write_flag", address, value, stream.cuda_stream)


def stream_wait_flag(
    flags: torch.Tensor, index: int, value: int, stream: torch.cuda.Stream
) -> None:
    """`stream`'s later work waits until `flags[index] == value`; the host does not wait."""
    address = flag_address(flags, index, "stream_wait_flag")
    _call("stream_wait_flag", "neod_stream_wait_flag", address, value, stream.cuda_stream)


def event_create() -> int:
    """A cudaEvent_t without timing, for `handoff` and `stream_wait_event`; free it with
    `event_destroy`."""
    event = ctypes.c_void_p()
    _call("event_create", "neod_event_create", ctypes.byref(event))
    return event.value


def event_destroy(event: int) -> None:
    _call("event_destroy", "neod_event_destroy", event)


def stream_wait_event(stream: int, event: int) -> None:
    """`stream` (a raw cudaStream_t) waits for the work recorded in `event` when issued."""
    _call("stream_wait_event", "neod_stream_wait_event", stream, event)


def handoff(
    after: int,
    joined: int | None,
    copy: int,
    wait_flag: int | None,
    wait_value: int,
    dst: int,
    dpitch: int,
    src: int,
    spitch: int,
    width: int,
    height: int,
    copied: int | None,
    set_flag: int | None,
    set_value: int,
) -> None:
    """One leg of a sub-batch's trip between the devices, in one call (neod_cuda.h): on the raw
    stream `copy`, join `after` through event `joined`, wait for the flag at address `wait_flag`,
    copy `height` rows of `width` bytes (pitches in bytes), record `copied`, set `set_flag`. None
    skips a step, height 0 the copy. The pointers are the caller's to check: this is the hot
    path of the pipelined forward."""
    _call("handoff", "neod_handoff", after, joined, copy, wait_flag, wait_value, dst, dpitch, src,
          spitch, width, height, copied, set_flag, set_value)  # fmt: skip
