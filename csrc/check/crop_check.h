// crop_check.h -- the interface between the kernel check's cases (crop_check.cpp) and its two backends:
// the real GPU (crop_check_gpu.cu, nvcc) and the serial CPU emulation (crop_emulate.cpp, g++).
#ifndef OBJCROP_CROP_CHECK_H
#define OBJCROP_CROP_CHECK_H

#include <string>
#include <vector>

#include "objcrop_crop_plan.h"

// Run the kernels of `plan`, whose per-view blocks hold the images' and outputs' BYTE OFFSETS into two arenas
// (not addresses: each backend rebases them onto its own copies), then finish it (oc_plan_finish).
// images: every sample's HWC uint8 image; out: resized to out_bytes and filled with both views' outputs.
// Returns "" or the error (a refused plan, a CUDA error), and the kernels' time in ms (GPU; 0 emulated).
std::string oc_check_backend_run(OcCropPlan plan, const std::vector<unsigned char>& images, size_t out_bytes,
                                 std::vector<unsigned char>* out, double* kernel_ms);

// The backend's name and device ("gpu: NVIDIA H200, sm_90" / "emulated on the CPU").
std::string oc_check_backend_name();

void oc_emulate_launch(const OcCropPlan& plan, float* scratch);

#endif  // OBJCROP_CROP_CHECK_H
