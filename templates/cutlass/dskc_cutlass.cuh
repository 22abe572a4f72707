// Shared launcher glue for dskc's CUTLASS instantiations (included by every rendered <stem>.cu).
//
// Contract of every exported entry point: returns 0 on success, otherwise a nonzero code with a human-readable
// message written (NUL-terminated, truncated to err_len) into `err`. Nothing here allocates device memory: the
// caller passes a workspace of at least the size the matching *_workspace_bytes() entry point reported.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace dskc {

enum Code : int { kOk = 0, kBadArgument = 1, kCannotImplement = 2, kWorkspaceTooSmall = 3, kCudaError = 4,
                  kCutlassError = 5 };

inline int fail(char* err, int err_len, int code, const char* fmt, ...) {
  if (err != nullptr && err_len > 0) {
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(err, static_cast<size_t>(err_len), fmt, ap);
    va_end(ap);
  }
  return code;
}

constexpr size_t kAlign = 256;

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

inline cutlass::KernelHardwareInfo hw_info(int sm_count) {
  cutlass::KernelHardwareInfo info;
  int device = 0;
  cudaGetDevice(&device);
  info.device_id = device;
  info.sm_count = sm_count;
  return info;
}

// can_implement -> workspace check -> initialize -> run, each failure reported with its reason.
template <class Gemm>
int run_gemm(typename Gemm::Arguments const& args, void* workspace, size_t workspace_bytes, cudaStream_t stream,
             char* err, int err_len) {
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) {
    return fail(err, err_len, kCannotImplement, "CUTLASS cannot implement this problem: %s",
                cutlassGetStatusString(status));
  }
  size_t need = Gemm::get_workspace_size(args);
  if (need > workspace_bytes) {
    return fail(err, err_len, kWorkspaceTooSmall, "CUTLASS workspace needs %zu bytes, got %zu", need,
                workspace_bytes);
  }
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    return fail(err, err_len, kCutlassError, "CUTLASS initialize failed: %s", cutlassGetStatusString(status));
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    return fail(err, err_len, kCutlassError, "CUTLASS run failed: %s", cutlassGetStatusString(status));
  }
  cudaError_t cuda = cudaGetLastError();
  if (cuda != cudaSuccess) {
    return fail(err, err_len, kCudaError, "CUDA error after launch: %s", cudaGetErrorString(cuda));
  }
  return kOk;
}

}  // namespace dskc
