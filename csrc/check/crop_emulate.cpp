// crop_emulate.cpp -- run fn.objcrop.crop's GPU kernels (csrc/dali/objcrop_crop_kernels.h) on the CPU, serially,
// with the operator's own launch plan (csrc/dali/objcrop_crop_plan.h), for tests without a GPU.  Test-only:
// not part of the plugin library or the wheel.
//
// The CUDA keywords become plain C++, blockIdx / threadIdx / blockDim / gridDim are globals, and the launcher
// walks the plan's grids block by block, thread by thread, reading the parameters from the plan's packed
// block as the kernels read its device copy.  The row kernel's barrier is honoured by running phase 1 for
// every thread of a block before phase 2 (the kernel's body is only these two calls around __syncthreads(),
// which the real-GPU check in crop_check_gpu.cu runs as written).
#include <vector>

struct OcDim3 {
  unsigned int x, y, z;
};
static OcDim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__ static inline
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(n)
#define __syncthreads() ((void)0)

#include "crop_check.h"
#include "objcrop_crop_kernels.h"

// Both kernels of a finished plan, emulated (the counterpart of oc_crop_launch).
void oc_emulate_launch(const OcCropPlan& plan, float* scratch) {
  if (plan.n == 0) return;
  const OcPackedPtrs d = oc_packed_ptrs(plan, plan.packed.data());
  std::vector<float> row(plan.rows.smem / sizeof(float) + 1);
  const OcLaunch& r = plan.rows;
  blockDim = {r.block, 1, 1};
  gridDim = {r.grid[0], r.grid[1], r.grid[2]};
  for (unsigned z = 0; z < gridDim.z; ++z)
    for (unsigned y = 0; y < gridDim.y; ++y)
      for (unsigned x = 0; x < gridDim.x; ++x) {
        blockIdx = {x, y, z};
        const OcViewParams* p = oc_rows_view(d.params);  // as oc_crop_rows_kernel
        if (!p) continue;
        int blur = 0;
        for (unsigned t = 0; t < blockDim.x; ++t) {
          threadIdx = {t, 0, 0};
          blur = oc_rows_phase1(*p, d.norm, plan.out_kind, row.data());
        }
        if (!blur) continue;
        for (unsigned t = 0; t < blockDim.x; ++t) {  // after the barrier
          threadIdx = {t, 0, 0};
          oc_rows_phase2(*p, d.taps, row.data(), scratch);
        }
      }
  const OcLaunch& c = plan.cols;
  blockDim = {c.block, 1, 1};
  gridDim = {c.grid[0], 1, 1};
  const int nb = static_cast<int>(plan.blurred.size());
  for (unsigned x = 0; x < gridDim.x; ++x) {
    blockIdx = {x, 0, 0};
    for (unsigned t = 0; t < blockDim.x; ++t) {
      threadIdx = {t, 0, 0};
      oc_blur_cols_kernel(d.params, d.blurred, d.blur_first, nb, d.taps, d.norm, plan.out_kind, scratch);
    }
  }
}

extern "C" {

// For tests through ctypes: n samples of `views` views each (2 global of side S, then views - 2 local ones of
// side local_S); ptrs (n,) image addresses (HWC uint8 RGB); sizes (n, 2) (width, height); windows (n, views,
// 4); flips (n, views); aug (n, views, OC_AUG_K); norm (6,) mean[3], 1/std[3]; kind OC_OUT_*; outs (n, views)
// addresses of each view's (3, side, side) output.  Returns 0, 1 + the index of the first invalid view, or -1
// when the plan refuses the batch (limits).
int oc_emu_crop_views(int n, int views, const unsigned long long* ptrs, const int* sizes, const int* windows,
                      const unsigned char* flips, const float* aug, int S, int local_S, const float* norm,
                      float contrast_center, int kind, const unsigned long long* outs) {
  OcCropPlan plan;
  oc_plan_begin(plan, n, S, kind, norm, views - 2, local_S);
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < views; ++v) {
      const int k = views * i + v;
      if (!oc_plan_view(plan, i, v, sizes[2 * i], sizes[2 * i + 1], windows + 4 * k, flips[k], aug + k * OC_AUG_K,
                        contrast_center).empty())
        return 1 + k;
      plan.params[k].image = ptrs[i];
      plan.params[k].out = outs[k];
    }
  if (!oc_plan_finish(plan).empty()) return -1;
  std::vector<float> scratch(plan.scratch_floats + 1);
  oc_emulate_launch(plan, scratch.data());
  return 0;
}

// The two global views only (n, 2) of everything above: oc_emu_crop_views with views = 2.
int oc_emu_crop_aug(int n, const unsigned long long* ptrs, const int* sizes, const int* windows,
                    const unsigned char* flips, const float* aug, int S, const float* norm, float contrast_center,
                    int kind, const unsigned long long* outs) {
  return oc_emu_crop_views(n, 2, ptrs, sizes, windows, flips, aug, S, 0, norm, contrast_center, kind, outs);
}

}  // extern "C"
