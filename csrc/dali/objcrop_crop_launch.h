// objcrop_crop_launch.h -- launch fn.objcrop.crop's two kernels for a finished OcCropPlan (nvcc only).
//
// Shared by the DALI operator (objcrop_crop_kernels.cu, called from objcrop_crop_gpu.cc) and the standalone kernel check (csrc/check/crop_check_gpu.cu),
// so the check runs the operator's own launch code: grids, block sizes, shared memory and the parameter
// pointers all come from the plan (objcrop_crop_plan.h).  A .h (not .cuh) so that the plugin build's source
// hash, which covers csrc/dali/*.h, sees its edits.
#ifndef OBJCROP_CROP_LAUNCH_H
#define OBJCROP_CROP_LAUNCH_H

#include <cuda_runtime.h>

#include "objcrop_crop_kernels.h"
#include "objcrop_crop_plan.h"

// d_packed: a device copy of plan.packed (8-byte aligned); d_scratch: plan.scratch_floats floats (may be null
// when there is no blurred view).  Returns the first launch error (cudaSuccess when both launched).
inline cudaError_t oc_crop_launch(const OcCropPlan &plan, const void *d_packed, float *d_scratch,
                                  cudaStream_t stream) {
  if (plan.n == 0) return cudaSuccess;
  const OcPackedPtrs d = oc_packed_ptrs(plan, d_packed);
  const OcLaunch &r = plan.rows;
  oc_crop_rows_kernel<<<dim3(r.grid[0], r.grid[1], r.grid[2]), r.block, r.smem, stream>>>(
      d.params, d.taps, d.norm, plan.out_kind, d_scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.cols.grid[0] == 0) return err;
  const OcLaunch &c = plan.cols;
  oc_blur_cols_kernel<<<dim3(c.grid[0], c.grid[1], c.grid[2]), c.block, c.smem, stream>>>(
      d.params, d.blurred, d.blur_first, static_cast<int>(plan.blurred.size()), d.taps, d.norm, plan.out_kind,
      d_scratch);
  return cudaGetLastError();
}

#endif  // OBJCROP_CROP_LAUNCH_H
