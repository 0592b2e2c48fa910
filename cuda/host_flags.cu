/*
 * Flags in pinned host memory, written and awaited by a stream: the handshake between the GPU's
 * copy streams and the CPU attention program (neod/cython/neod_layers.h). The stream's front end
 * does the polling, so no SM is held while it waits, and the host thread that issues the work
 * never blocks. The driver entry points are resolved through the runtime, so the library needs no
 * link against libcuda.
 *
 * neod_handoff issues a whole leg of a sub-batch's trip (join, flag wait, copy, event, flag write)
 * in one call: from Python, the same steps cost about ten calls into torch and the driver per
 * layer and sub-batch, on the thread that must keep the GPU fed.
 */
#include <cuda.h>

#include "common.cuh"

namespace {

using StreamValueFn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

StreamValueFn resolve(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess) {
    return nullptr;
  }
  return reinterpret_cast<StreamValueFn>(fn);
}

int device_address(const uint32_t* flag, CUdeviceptr* out) {
  if (flag == nullptr || reinterpret_cast<uintptr_t>(flag) % alignof(uint32_t) != 0) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  void* device = nullptr;
  cudaError_t err = cudaHostGetDevicePointer(&device, const_cast<uint32_t*>(flag), 0);
  if (err != cudaSuccess) return err;
  *out = reinterpret_cast<CUdeviceptr>(device);
  return NEOD_OK;
}

int write_flag(uint32_t* flag, uint32_t value, cudaStream_t stream) {
  static StreamValueFn write = resolve("cuStreamWriteValue32");
  if (write == nullptr) return NEOD_ERR_DRIVER;
  CUdeviceptr address;
  int status = device_address(flag, &address);
  if (status != NEOD_OK) return status;
  // The default flags put a system-wide memory fence before the write: everything the stream
  // wrote to host memory before it is visible once the flag is.
  return write(reinterpret_cast<CUstream>(stream), address, value, 0) == CUDA_SUCCESS
             ? NEOD_OK
             : NEOD_ERR_DRIVER;
}

int wait_flag(const uint32_t* flag, uint32_t value, cudaStream_t stream) {
  static StreamValueFn wait = resolve("cuStreamWaitValue32");
  if (wait == nullptr) return NEOD_ERR_DRIVER;
  CUdeviceptr address;
  int status = device_address(flag, &address);
  if (status != NEOD_OK) return status;
  return wait(reinterpret_cast<CUstream>(stream), address, value, CU_STREAM_WAIT_VALUE_EQ) ==
                 CUDA_SUCCESS
             ? NEOD_OK
             : NEOD_ERR_DRIVER;
}

}  // namespace

extern "C" int neod_stream_write_flag(uint32_t* flag, uint32_t value, cudaStream_t stream) {
  return write_flag(flag, value, stream);
}

extern "C" int neod_stream_wait_flag(const uint32_t* flag, uint32_t value, cudaStream_t stream) {
  return wait_flag(flag, value, stream);
}

extern "C" int neod_event_create(cudaEvent_t* event) {
  if (event == nullptr) return NEOD_ERR_INVALID_ARGUMENT;
  return cudaEventCreateWithFlags(event, cudaEventDisableTiming);
}

extern "C" int neod_event_destroy(cudaEvent_t event) {
  return event == nullptr ? NEOD_OK : cudaEventDestroy(event);
}

extern "C" int neod_stream_wait_event(cudaStream_t stream, cudaEvent_t event) {
  if (event == nullptr) return NEOD_ERR_INVALID_ARGUMENT;
  return cudaStreamWaitEvent(stream, event, 0);
}

extern "C" int neod_handoff(cudaStream_t after, cudaEvent_t joined, cudaStream_t copy,
                            const uint32_t* wait_flag_ptr, uint32_t wait_value, void* dst,
                            int64_t dpitch, const void* src, int64_t spitch, int64_t width,
                            int64_t height, cudaEvent_t copied, uint32_t* set_flag,
                            uint32_t set_value) {
  if (height < 0 || (height > 0 && (dst == nullptr || src == nullptr || width <= 0 ||
                                    (height > 1 && (dpitch < width || spitch < width))))) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  cudaError_t err;
  if (joined != nullptr) {
    if ((err = cudaEventRecord(joined, after)) != cudaSuccess) return err;
    if ((err = cudaStreamWaitEvent(copy, joined, 0)) != cudaSuccess) return err;
  }
  if (wait_flag_ptr != nullptr) {
    int status = wait_flag(wait_flag_ptr, wait_value, copy);
    if (status != NEOD_OK) return status;
  }
  if (height == 1) {
    err = cudaMemcpyAsync(dst, src, static_cast<size_t>(width), cudaMemcpyDefault, copy);
    if (err != cudaSuccess) return err;
  } else if (height > 1) {
    err = cudaMemcpy2DAsync(dst, static_cast<size_t>(dpitch), src, static_cast<size_t>(spitch),
                            static_cast<size_t>(width), static_cast<size_t>(height),
                            cudaMemcpyDefault, copy);
    if (err != cudaSuccess) return err;
  }
  if (copied != nullptr && (err = cudaEventRecord(copied, copy)) != cudaSuccess) return err;
  return set_flag == nullptr ? NEOD_OK : write_flag(set_flag, set_value, copy);
}
