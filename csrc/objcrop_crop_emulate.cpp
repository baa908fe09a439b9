// objcrop_crop_emulate.cpp -- run the GPU kernels of fn.objcrop.crop (csrc/dali/objcrop_crop_kernels.h)
// on the CPU, serially, for tests without a GPU (not part of the plugin library).
//
// As csrc/objcrop_emulate.cpp: the CUDA keywords become plain C++, blockIdx / threadIdx / blockDim are
// globals, and the launcher walks the grids block by block, thread by thread.  The row kernel's barrier
// is honoured by running phase 1 for every thread of a block before phase 2 (the kernel itself is only
// these two calls around __syncthreads).  The per-view parameter blocks are built as the operator's
// SetupImpl / GPU RunImpl build them (same OC_HD functions, same scratch-slot and tap layout).
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

#include "dali/objcrop_crop_kernels.h"

extern "C" {

// n samples; ptrs (n,) image addresses (HWC uint8 RGB); sizes (n, 2) (width, height); windows (n, 2, 4);
// flips (n, 2); aug (n, 2, OC_AUG_K); norm (6,) mean[3], 1/std[3]; kind OC_OUT_*; outs (n, 2) addresses
// of the (3, S, S) outputs.  Returns 0, or 1 + the index of the first view whose aug row is invalid.
int oc_emu_crop_aug(int n, const unsigned long long* ptrs, const int* sizes, const int* windows,
                    const unsigned char* flips, const float* aug, int S, const float* norm, float contrast_center,
                    int kind, const unsigned long long* outs, int row_threads, int col_threads) {
  std::vector<OcViewParams> params(2 * n);
  std::vector<float> taps;
  std::vector<int> blurred;
  for (int i = 0; i < n; ++i) {
    for (int v = 0; v < 2; ++v) {
      OcViewParams& p = params[2 * i + v];
      for (int k = 0; k < 4; ++k) p.win[k] = windows[(2 * i + v) * 4 + k];
      p.img_w = sizes[2 * i];
      p.img_h = sizes[2 * i + 1];
      p.flip = flips[2 * i + v] != 0;
      const float* a = aug + (2 * i + v) * OC_AUG_K;
      if (oc_view_from_aug(a, contrast_center, &p) != 0) return 1 + 2 * i + v;
      p.blur_offset = (int)taps.size();
      p.scratch = -1;
      if (p.blur_size) {
        taps.resize(taps.size() + p.blur_size);
        oc_gaussian_taps(a[OC_AUG_SIGMA], p.blur_size, taps.data() + p.blur_offset);
        p.scratch = (int)blurred.size();
        blurred.push_back(2 * i + v);
      }
      p.image = ptrs[i];
      p.out = outs[2 * i + v];
    }
  }
  std::vector<float> scratch((size_t)blurred.size() * S * S * 3 + 1);
  std::vector<float> row(3 * (size_t)S);
  // rows: grid (S, 2, n)
  blockDim = {(unsigned)row_threads, 1, 1};
  gridDim = {(unsigned)S, 2, (unsigned)n};
  for (unsigned z = 0; z < gridDim.z; ++z)
    for (unsigned y = 0; y < gridDim.y; ++y)
      for (unsigned x = 0; x < gridDim.x; ++x) {
        blockIdx = {x, y, z};
        const OcViewParams& p = params[2 * z + y];
        int blur = 0;
        for (unsigned t = 0; t < blockDim.x; ++t) {
          threadIdx = {t, 0, 0};
          blur = oc_rows_phase1(p, norm, S, kind, row.data());
        }
        if (!blur) continue;
        for (unsigned t = 0; t < blockDim.x; ++t) {  // after the barrier
          threadIdx = {t, 0, 0};
          oc_rows_phase2(p, taps.data(), S, row.data(), scratch.data());
        }
      }
  // columns: flattened grid (blurred views * chunks)
  if (!blurred.empty()) {
    const unsigned chunks = (unsigned)((S * S + col_threads - 1) / col_threads);
    blockDim = {(unsigned)col_threads, 1, 1};
    gridDim = {(unsigned)blurred.size() * chunks, 1, 1};
    for (unsigned x = 0; x < gridDim.x; ++x) {
      blockIdx = {x, 0, 0};
      for (unsigned t = 0; t < blockDim.x; ++t) {
        threadIdx = {t, 0, 0};
        oc_blur_cols_kernel(params.data(), blurred.data(), taps.data(), norm, S, kind, scratch.data());
      }
    }
  }
  return 0;
}

}  // extern "C"
