// objcrop_crop_kernels.h -- the CUDA kernels of fn.objcrop.crop's GPU backend (no DALI dependency; a .h so that
// the plugin build's source hash, which covers csrc/dali/*.h, sees its edits).
//
// The arithmetic is the OC_HD code of ../objcrop_core.h (oc_resample_pixel, the fused kernel's
// resampler) and objcrop_augment.h (colour, reflect-101 Gaussian blur, solarise, normalise, stores), the
// same functions the CPU backend calls.  Two launches per batch, both on the operator's stream, with the grids,
// shared memory and parameter layout of objcrop_crop_plan.h (launched by objcrop_crop_launch.h):
//
// oc_crop_rows_kernel  grid (S, 2, N): one block per output row of one view.  Each thread resamples
//   pixels x = tid, tid + blockDim.x, ... of the row (3 channels), applies the colour twist + clamp;
//   a view without blur is solarised, normalised and stored (C, S, S) right away; a blurred view keeps
//   its row in shared memory (3 * S floats) and stores the row blurred along x (reflect-101 inside the
//   row) into its slot of the float scratch buffer (HWC, S x S x 3 per blurred view).
// oc_blur_cols_kernel  grid (number of blurred views * ceil(S*S / 256)) (flattened: gridDim.y/z are
//   limited to 65535): the blur along y from the scratch buffer, then solarise, normalise, store.
#ifndef OBJCROP_CROP_KERNELS_H
#define OBJCROP_CROP_KERNELS_H

#include "objcrop_crop_plan.h"  // OcViewParams, OC_ROW_THREADS, OC_COL_THREADS

__device__ __forceinline__ void oc_finish_pixel(const OcViewParams& p, const float* __restrict__ norm, int S,
                                                int pix, const float* rgb, int out_kind) {
  const oc_i64 plane = (oc_i64)S * S;
  for (int c = 0; c < 3; ++c) {
    float v = p.do_solarize ? oc_solarize(rgb[c]) : rgb[c];
    oc_store_out((void*)p.out, c * plane + pix, oc_normalize(v, norm, c), out_kind);
  }
}

// The row kernel's two phases around its barrier (separate functions so that the CPU emulation in
// csrc/check/crop_emulate.cpp can run every thread's first phase before any second phase).
// Phase 1: resample + colour pixel x = tid, tid + blockDim.x, ...; finished here when not blurred, else
// kept in the shared row.  Returns whether the view is blurred (uniform over the block).
__device__ __forceinline__ int oc_rows_phase1(const OcViewParams& p, const float* __restrict__ norm, int S,
                                              int out_kind, float* row) {
  const int oy = blockIdx.x;
  const unsigned char* img = (const unsigned char*)p.image;
  const int blur = p.blur_size;
  for (int x = threadIdx.x; x < S; x += blockDim.x) {
    float rgb[3];
    oc_resample_pixel(img, p.img_w, p.win, p.flip, S, x, oy, rgb);
    if (p.do_colour) oc_apply_colour(p.colour, rgb);
    if (!blur) {
      oc_finish_pixel(p, norm, S, oy * S + x, rgb, out_kind);
    } else {
      for (int c = 0; c < 3; ++c) row[3 * x + c] = rgb[c];
    }
  }
  return blur;
}

// Phase 2 (blurred views): the row blurred along x (reflect-101 inside the row) into the view's scratch
// slot, HWC float.
__device__ __forceinline__ void oc_rows_phase2(const OcViewParams& p, const float* __restrict__ taps, int S,
                                               const float* row, float* __restrict__ scratch) {
  float* dst = scratch + ((oc_i64)p.scratch * S + blockIdx.x) * S * 3;
  const float* t = taps + p.blur_offset;
  for (int x = threadIdx.x; x < S; x += blockDim.x)
    for (int c = 0; c < 3; ++c) dst[3 * x + c] = oc_blur_at(row + c, 3, S, x, t, p.blur_size);
}

__global__ void __launch_bounds__(OC_ROW_THREADS)
    oc_crop_rows_kernel(const OcViewParams* __restrict__ params, const float* __restrict__ taps,
                        const float* __restrict__ norm, int S, int out_kind, float* __restrict__ scratch) {
  extern __shared__ float oc_row[];  // 3 * S floats, blurred views only
  const OcViewParams& p = params[2 * blockIdx.z + blockIdx.y];
  if (!oc_rows_phase1(p, norm, S, out_kind, oc_row)) return;  // uniform: the barrier below is safe
  __syncthreads();
  oc_rows_phase2(p, taps, S, oc_row, scratch);
}

__global__ void __launch_bounds__(OC_COL_THREADS)
    oc_blur_cols_kernel(const OcViewParams* __restrict__ params, const int* __restrict__ blurred,
                        const float* __restrict__ taps, const float* __restrict__ norm, int S, int out_kind,
                        const float* __restrict__ scratch) {
  const int chunks = (S * S + blockDim.x - 1) / blockDim.x;
  const int b = blockIdx.x / chunks;
  const OcViewParams& p = params[blurred[b]];
  const int pix = (blockIdx.x - b * chunks) * blockDim.x + threadIdx.x;
  if (pix >= S * S) return;
  const int y = pix / S, x = pix - y * S;
  const float* base = scratch + (oc_i64)p.scratch * S * S * 3 + 3 * x;
  const float* t = taps + p.blur_offset;
  float rgb[3];
  for (int c = 0; c < 3; ++c) rgb[c] = oc_blur_at(base + c, 3 * S, S, y, t, p.blur_size);
  oc_finish_pixel(p, norm, S, pix, rgb, out_kind);
}

#endif  // OBJCROP_CROP_KERNELS_H
