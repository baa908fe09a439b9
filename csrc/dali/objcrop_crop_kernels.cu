// objcrop_crop_kernels.cu -- fn.objcrop.crop's CUDA kernels and their launch, the plugin's only nvcc source.
//
// No DALI header here: nvcc parses this file once per target architecture (sm_75 and up + PTX, build.py), so it
// holds only the kernels (objcrop_crop_kernels.h) and the launch code shared with the standalone kernel check
// (objcrop_crop_launch.h); the operator (objcrop_crop_gpu.cc, host code) calls oc_crop_launch_kernels.
#include "objcrop_crop_launch.h"

cudaError_t oc_crop_launch_kernels(const OcCropPlan &plan, const void *d_packed, float *d_scratch,
                                   cudaStream_t stream) {
  return oc_crop_launch(plan, d_packed, d_scratch, stream);
}
