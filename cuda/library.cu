/*
 * Library-wide entry points: the ABI version the Python binding checks at load time, and status
 * text for error messages.
 */
#include "common.cuh"

// Bump whenever a signature in neod_cuda.h changes.
#define NEOD_ABI_VERSION 4

extern "C" int neod_abi_version(void) { return NEOD_ABI_VERSION; }

extern "C" const char* neod_cuda_error_string(int status) {
  switch (status) {
    case NEOD_OK: return "success";
    case NEOD_ERR_INVALID_ARGUMENT: return "invalid argument";
    case NEOD_ERR_UNSUPPORTED: return "unsupported dtype, shape or alignment";
    case NEOD_ERR_WORKSPACE: return "split-KV workspace too small";
    case NEOD_ERR_DRIVER: return "driver stream memory operation failed or unavailable";
    default: return cudaGetErrorString(static_cast<cudaError_t>(status));
  }
}
