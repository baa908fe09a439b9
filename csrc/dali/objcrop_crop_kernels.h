// objcrop_crop_kernels.h -- the CUDA kernels of fn.objcrop.crop's GPU backend (no DALI dependency; a .h so that
// the plugin build's source hash, which covers csrc/dali/*.h, sees its edits).
//
// The arithmetic is the OC_HD code of ../objcrop_core.h (oc_resample_pixel, the fused kernel's
// resampler) and objcrop_augment.h (colour, reflect-101 Gaussian blur, solarise, normalise, stores), the
// same functions the CPU backend calls.  Two launches per batch, both on the operator's stream, with the grids,
// shared memory and parameter layout of objcrop_crop_plan.h (launched by objcrop_crop_launch.h), covering every
// view of every sample (V per sample: 2 global, then the local ones), each view of its own side S = p.size:
//
// oc_crop_rows_kernel  grid (Smax, V, N), Smax the batch's largest side: one block per output row of one view
//   (a block past its view's S rows returns at once, uniformly).  Each thread resamples pixels x = tid,
//   tid + blockDim.x, ... of the row (3 channels), applies the colour twist + clamp; a view without blur is
//   solarised, normalised and stored (C, S, S) right away; a blurred view keeps its row in shared memory
//   (3 * S floats) and stores the row blurred along x (reflect-101 inside the row) into its part of the float
//   scratch buffer (HWC, S x S x 3 floats from p.scratch).
// oc_blur_cols_kernel  grid (sum over the blurred views of ceil(S*S / 256)) (flattened: gridDim.y/z are
//   limited to 65535; a block finds its view by a binary search of the blurred views' first blocks): the blur
//   along y from the scratch buffer, then solarise, normalise, store.
#ifndef OBJCROP_CROP_KERNELS_H
#define OBJCROP_CROP_KERNELS_H

#include "objcrop_crop_plan.h"  // OcViewParams, OC_ROW_THREADS, OC_COL_THREADS

__device__ __forceinline__ void oc_finish_pixel(const OcViewParams& p, const float* __restrict__ norm, int pix,
                                                const float* rgb, int out_kind) {
  const oc_i64 plane = (oc_i64)p.size * p.size;
  for (int c = 0; c < 3; ++c) {
    float v = p.do_solarize ? oc_solarize(rgb[c]) : rgb[c];
    oc_store_out((void*)p.out, c * plane + pix, oc_normalize(v, norm, c), out_kind);
  }
}

// The view of a row-kernel block: sample blockIdx.z, view blockIdx.y (params[gridDim.y * z + y]); null for a
// block past the view's own rows (the grid covers the batch's largest side), the same for every thread.
__device__ __forceinline__ const OcViewParams* oc_rows_view(const OcViewParams* __restrict__ params) {
  const OcViewParams* p = params + ((oc_i64)gridDim.y * blockIdx.z + blockIdx.y);
  return (int)blockIdx.x < p->size ? p : nullptr;
}

// The row kernel's two phases around its barrier (separate functions so that the CPU emulation in
// csrc/check/crop_emulate.cpp can run every thread's first phase before any second phase).
// Phase 1: resample + colour pixel x = tid, tid + blockDim.x, ...; finished here when not blurred, else
// kept in the shared row.  Returns whether the view is blurred (uniform over the block).
__device__ __forceinline__ int oc_rows_phase1(const OcViewParams& p, const float* __restrict__ norm, int out_kind,
                                              float* row) {
  const int oy = blockIdx.x, S = p.size;
  const unsigned char* img = (const unsigned char*)p.image;
  const int blur = p.blur_size;
  for (int x = threadIdx.x; x < S; x += blockDim.x) {
    float rgb[3];
    oc_resample_pixel(img, p.img_w, p.win, p.flip, S, x, oy, rgb);
    if (p.do_colour) oc_apply_colour(p.colour, rgb);
    if (!blur) {
      oc_finish_pixel(p, norm, oy * S + x, rgb, out_kind);
    } else {
      for (int c = 0; c < 3; ++c) row[3 * x + c] = rgb[c];
    }
  }
  return blur;
}

// Phase 2 (blurred views): the row blurred along x (reflect-101 inside the row) into the view's part of the
// scratch buffer, HWC float.
__device__ __forceinline__ void oc_rows_phase2(const OcViewParams& p, const float* __restrict__ taps,
                                               const float* row, float* __restrict__ scratch) {
  const int S = p.size;
  float* dst = scratch + p.scratch + (oc_i64)blockIdx.x * S * 3;
  const float* t = taps + p.blur_offset;
  for (int x = threadIdx.x; x < S; x += blockDim.x)
    for (int c = 0; c < 3; ++c) dst[3 * x + c] = oc_blur_at(row + c, 3, S, x, t, p.blur_size);
}

__global__ void __launch_bounds__(OC_ROW_THREADS)
    oc_crop_rows_kernel(const OcViewParams* __restrict__ params, const float* __restrict__ taps,
                        const float* __restrict__ norm, int out_kind, float* __restrict__ scratch) {
  extern __shared__ float oc_row[];  // 3 * Smax floats, blurred views only
  const OcViewParams* p = oc_rows_view(params);
  if (!p) return;                                          // uniform: the barrier below is safe
  if (!oc_rows_phase1(*p, norm, out_kind, oc_row)) return;  // uniform too
  __syncthreads();
  oc_rows_phase2(*p, taps, oc_row, scratch);
}

// The blurred view (its index into `blurred`) of a column-blur block: the last b with first[b] <= blockIdx.x
// (first: the nb blurred views' first blocks, ascending).
__device__ __forceinline__ int oc_cols_view(const int* __restrict__ first, int nb) {
  const int x = blockIdx.x;
  int lo = 0, hi = nb - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (first[mid] <= x) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(OC_COL_THREADS)
    oc_blur_cols_kernel(const OcViewParams* __restrict__ params, const int* __restrict__ blurred,
                        const int* __restrict__ first, int nb, const float* __restrict__ taps,
                        const float* __restrict__ norm, int out_kind, const float* __restrict__ scratch) {
  const int b = oc_cols_view(first, nb);
  const OcViewParams& p = params[blurred[b]];
  const int S = p.size;
  const int pix = ((int)blockIdx.x - first[b]) * blockDim.x + threadIdx.x;
  if (pix >= S * S) return;
  const int y = pix / S, x = pix - y * S;
  const float* base = scratch + p.scratch + 3 * x;
  const float* t = taps + p.blur_offset;
  float rgb[3];
  for (int c = 0; c < 3; ++c) rgb[c] = oc_blur_at(base + c, 3 * S, S, y, t, p.blur_size);
  oc_finish_pixel(p, norm, pix, rgb, out_kind);
}

#endif  // OBJCROP_CROP_KERNELS_H
