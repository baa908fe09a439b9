// objcrop_kernel.cu -- fused two-view object-aware crop for a ragged batch.
//
// Loaded at run time with cupy.RawModule (dali_objcrop/kernels/cupy_backend.py,
// which inlines objcrop_core.h textually, so NVRTC needs no include path and
// CuPy's source-keyed cache sees header edits).  All arithmetic is in
// objcrop_core.h; this file only maps threads onto it.
//
// objcrop_windows: one thread per sample, the windows alone (to compare with
//   dali_objcrop/windows.py bit for bit).
// objcrop_apply_{u8,f32}: windows given (N, 2, 4) + flips (N, 2): both views as
//   HWC (N, S, S, 3) uint8 or float32 in pixel units, for the DALI graph, which
//   samples windows in NumPy and augments and normalises after the crop.
// objcrop_crop_{f32,f16,bf16}: one launch for both views of a whole batch.
//   grid = (ceil(S*S / (blockDim.x * OC_PIX_PER_THREAD)), 2 views, N samples);
//   thread 0 of a block derives the sample's windows into shared memory (cheap:
//   <= 20 tries of a few float64 ops), then every thread resamples
//   OC_PIX_PER_THREAD output pixels of that view (3 channels each, strided by
//   blockDim.x so stores coalesce), normalises and writes NCHW.
//
// Inputs (device memory):
//   ptrs    (N,) uint64     base address of image n, HWC uint8 RGB, contiguous
//   sizes   (N, 2) int32    (width, height) of image n
//   boxes   (M, 4) float32  normalised proposals, best-first per image
//   offsets (N + 1,) int64  image n owns boxes[offsets[n]:offsets[n+1]]
//   index   (N,) int64      dataset positions (the random key)
//   params  (18,) float64   the OC_P_* block (kernels/common.py: kernel_params)
//   norm    (6,) float32    mean[3], 1/std[3] in pixel units (0..255)
// Outputs: out0, out1 (N, 3, S, S) of the output dtype; optional windows
//   (N, 2, 4) int32 and flips (N, 2) uint8 (pass 0 to skip).
#include "objcrop_core.h"

// Output pixels per thread: a block covers blockDim.x * OC_PIX_PER_THREAD pixels of one view, so the
// per-block window derivation (thread 0) is amortised over more work.  Must equal _PIX_PER_THREAD in
// dali_objcrop/kernels/cupy_backend.py.
#define OC_PIX_PER_THREAD 4

extern "C" __global__ void objcrop_windows(const int* __restrict__ sizes, const float* __restrict__ boxes,
                                           const long long* __restrict__ offsets,
                                           const long long* __restrict__ index, int n,
                                           unsigned long long seed, unsigned long long epoch,
                                           const double* __restrict__ params, int* windows, int* regions,
                                           unsigned char* flips, int* box_index, unsigned char* fallback,
                                           int* shift) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  OcSample s = oc_sample_windows(i, sizes, boxes, offsets, index, seed, epoch, params);
  oc_store_sample(i, s, windows, regions, flips, box_index, fallback, shift);
}


struct OcF16 {};
struct OcBF16 {};

template <typename Tag>
__device__ __forceinline__ void oc_store_bits(unsigned short* out, long long i, float v);

template <>
__device__ __forceinline__ void oc_store_bits<OcF16>(unsigned short* out, long long i, float v) {
  out[i] = oc_f32_to_f16(v);
}

template <>
__device__ __forceinline__ void oc_store_bits<OcBF16>(unsigned short* out, long long i, float v) {
  out[i] = oc_f32_to_bf16(v);
}

// The fused body; Store writes one normalised float into the output buffer.
template <typename T, typename Store>
__device__ __forceinline__ void oc_crop_body(const unsigned long long* __restrict__ ptrs,
                                             const int* __restrict__ sizes, const float* __restrict__ boxes,
                                             const long long* __restrict__ offsets,
                                             const long long* __restrict__ index, unsigned long long seed,
                                             unsigned long long epoch, const double* __restrict__ params,
                                             const float* __restrict__ norm, int out_size, T* out0, T* out1,
                                             int* windows, unsigned char* flips, Store store) {
  __shared__ int s_win[4];
  __shared__ int s_flip;
  const int n = blockIdx.z, v = blockIdx.y;
  if (threadIdx.x == 0) {
    OcSample s = oc_sample_windows(n, sizes, boxes, offsets, index, seed, epoch, params);
    for (int k = 0; k < 4; ++k) s_win[k] = s.win[v][k];
    s_flip = s.flip[v];
    if (blockIdx.x == 0 && windows != 0) {
      for (int k = 0; k < 4; ++k) windows[(n * 2 + v) * 4 + k] = s.win[v][k];
      flips[n * 2 + v] = (unsigned char)s.flip[v];
    }
  }
  __syncthreads();
  const int plane = out_size * out_size;
  const unsigned char* img = (const unsigned char*)ptrs[n];
  T* out = v == 0 ? out0 : out1;
  const int end = min(plane, (int)((blockIdx.x + 1) * blockDim.x * OC_PIX_PER_THREAD));
  for (int pix = blockIdx.x * blockDim.x * OC_PIX_PER_THREAD + threadIdx.x; pix < end; pix += blockDim.x) {
    const int oy = pix / out_size, ox = pix - oy * out_size;
    float rgb[3];
    oc_resample_pixel(img, sizes[2 * n], s_win, s_flip, out_size, ox, oy, rgb);
    const long long base = (long long)n * 3 * plane + pix;
    for (int c = 0; c < 3; ++c) store(out, base + (long long)c * plane, (rgb[c] - norm[c]) * norm[3 + c]);
  }
}

struct OcStoreF32 {
  __device__ __forceinline__ void operator()(float* out, long long i, float v) const { out[i] = v; }
};
template <typename Tag>
struct OcStoreBits {
  __device__ __forceinline__ void operator()(unsigned short* out, long long i, float v) const {
    oc_store_bits<Tag>(out, i, v);
  }
};

#define OC_CROP_ARGS                                                                                      \
  const unsigned long long *__restrict__ ptrs, const int *__restrict__ sizes,                             \
      const float *__restrict__ boxes, const long long *__restrict__ offsets,                             \
      const long long *__restrict__ index, unsigned long long seed, unsigned long long epoch,             \
      const double *__restrict__ params, const float *__restrict__ norm, int out_size
#define OC_CROP_PASS ptrs, sizes, boxes, offsets, index, seed, epoch, params, norm, out_size

extern "C" __global__ void __launch_bounds__(256) objcrop_crop_f32(OC_CROP_ARGS, float* out0, float* out1,
                                                                   int* windows, unsigned char* flips) {
  oc_crop_body<float>(OC_CROP_PASS, out0, out1, windows, flips, OcStoreF32());
}

extern "C" __global__ void __launch_bounds__(256)
    objcrop_crop_f16(OC_CROP_ARGS, unsigned short* out0, unsigned short* out1, int* windows,
                     unsigned char* flips) {
  oc_crop_body<unsigned short>(OC_CROP_PASS, out0, out1, windows, flips, OcStoreBits<OcF16>());
}

extern "C" __global__ void __launch_bounds__(256)
    objcrop_crop_bf16(OC_CROP_ARGS, unsigned short* out0, unsigned short* out1, int* windows,
                      unsigned char* flips) {
  oc_crop_body<unsigned short>(OC_CROP_PASS, out0, out1, windows, flips, OcStoreBits<OcBF16>());
}

// Given windows: HWC views in pixel units, uint8 (rounded to nearest even, clamped) or float32 (as
// resampled, no rounding: the DALI graph augments in float).  grid as for the fused kernel.
__device__ __forceinline__ void oc_store_px(unsigned char* p, float v) { *p = oc_to_u8(v); }
__device__ __forceinline__ void oc_store_px(float* p, float v) { *p = v; }

template <typename T>
__device__ __forceinline__ void oc_apply_body(const unsigned long long* __restrict__ ptrs,
                                              const int* __restrict__ sizes, const int* __restrict__ windows,
                                              const unsigned char* __restrict__ flips, int out_size, T* out0,
                                              T* out1) {
  const int n = blockIdx.z, v = blockIdx.y;
  const int plane = out_size * out_size;
  const int end = min(plane, (int)((blockIdx.x + 1) * blockDim.x * OC_PIX_PER_THREAD));
  for (int pix = blockIdx.x * blockDim.x * OC_PIX_PER_THREAD + threadIdx.x; pix < end; pix += blockDim.x) {
    const int oy = pix / out_size, ox = pix - oy * out_size;
    float rgb[3];
    oc_resample_pixel((const unsigned char*)ptrs[n], sizes[2 * n], windows + (n * 2 + v) * 4, flips[n * 2 + v],
                      out_size, ox, oy, rgb);
    T* out = (v == 0 ? out0 : out1) + ((long long)n * plane + pix) * 3;
    for (int c = 0; c < 3; ++c) oc_store_px(out + c, rgb[c]);
  }
}

extern "C" __global__ void __launch_bounds__(256)
    objcrop_apply_u8(const unsigned long long* __restrict__ ptrs, const int* __restrict__ sizes,
                     const int* __restrict__ windows, const unsigned char* __restrict__ flips, int out_size,
                     unsigned char* out0, unsigned char* out1) {
  oc_apply_body<unsigned char>(ptrs, sizes, windows, flips, out_size, out0, out1);
}

extern "C" __global__ void __launch_bounds__(256)
    objcrop_apply_f32(const unsigned long long* __restrict__ ptrs, const int* __restrict__ sizes,
                      const int* __restrict__ windows, const unsigned char* __restrict__ flips, int out_size,
                      float* out0, float* out1) {
  oc_apply_body<float>(ptrs, sizes, windows, flips, out_size, out0, out1);
}
