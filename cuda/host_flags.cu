/*
 * Flags in pinned host memory, written and awaited by a stream: the handshake between the GPU's
 * copy streams and the CPU attention program (neod/cython/neod_layers.h). The stream's front end
 * does the polling, so no SM is held while it waits, and the host thread that issues the work
 * never blocks. The driver entry points are resolved through the runtime, so the library needs no
 * link against libcuda.
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

}  // namespace

extern "C" int neod_stream_write_flag(uint32_t* flag, uint32_t value, cudaStream_t stream) {
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

extern "C" int neod_stream_wait_flag(const uint32_t* flag, uint32_t value, cudaStream_t stream) {
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
