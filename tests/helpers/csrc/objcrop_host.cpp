// objcrop_host.cpp -- the kernel body of objcrop_core.h compiled for the CPU.
//
// Not used in production: the tests build it with g++ into a shared library
// (tests/helpers/kernel_host.py) and call it through ctypes, so the exact
// arithmetic of the CUDA kernels is checked on machines without a GPU.  Each
// function is the serial loop over what one kernel launch does in parallel.
#include "objcrop_core.h"

extern "C" {

// Same outputs as the objcrop_windows kernel.
void oc_host_windows(const int* sizes, const float* boxes, const long long* offsets, const long long* index,
                     int n, unsigned long long seed, unsigned long long epoch, const double* params, int* windows,
                     int* regions, unsigned char* flips, int* box_index, unsigned char* fallback, int* shift) {
  for (int i = 0; i < n; ++i) {
    OcSample s = oc_sample_windows(i, sizes, boxes, offsets, index, seed, epoch, params);
    oc_store_sample(i, s, windows, regions, flips, box_index, fallback, shift);
  }
}

// Same as objcrop_crop_f32 (ptrs are host addresses here).
void oc_host_crop_f32(const unsigned long long* ptrs, const int* sizes, const float* boxes, const long long* offsets,
                      const long long* index, unsigned long long seed, unsigned long long epoch,
                      const double* params, const float* norm, int out_size, float* out0, float* out1,
                      int* windows, unsigned char* flips, int n) {
  const int plane = out_size * out_size;
  for (int i = 0; i < n; ++i) {
    OcSample s = oc_sample_windows(i, sizes, boxes, offsets, index, seed, epoch, params);
    const unsigned char* img = (const unsigned char*)ptrs[i];
    for (int v = 0; v < 2; ++v) {
      for (int k = 0; k < 4; ++k) windows[(i * 2 + v) * 4 + k] = s.win[v][k];
      flips[i * 2 + v] = (unsigned char)s.flip[v];
      float* out = v == 0 ? out0 : out1;
      for (int pix = 0; pix < plane; ++pix) {
        const int oy = pix / out_size, ox = pix - oy * out_size;
        float rgb[3];
        oc_resample_pixel(img, sizes[2 * i], s.win[v], s.flip[v], out_size, ox, oy, rgb);
        const long long base = (long long)i * 3 * plane + pix;
        for (int c = 0; c < 3; ++c) out[base + (long long)c * plane] = (rgb[c] - norm[c]) * norm[3 + c];
      }
    }
  }
}

// Same as objcrop_apply_u8.
void oc_host_apply_u8(const unsigned long long* ptrs, const int* sizes, const int* windows,
                      const unsigned char* flips, int out_size, unsigned char* out0, unsigned char* out1, int n) {
  const int plane = out_size * out_size;
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < 2; ++v)
      for (int pix = 0; pix < plane; ++pix) {
        const int oy = pix / out_size, ox = pix - oy * out_size;
        float rgb[3];
        oc_resample_pixel((const unsigned char*)ptrs[i], sizes[2 * i], windows + (i * 2 + v) * 4, flips[i * 2 + v],
                          out_size, ox, oy, rgb);
        unsigned char* out = (v == 0 ? out0 : out1) + ((long long)i * plane + pix) * 3;
        for (int c = 0; c < 3; ++c) out[c] = oc_to_u8(rgb[c]);
      }
}

void oc_host_to_f16(const float* x, unsigned short* y, long long n) {
  for (long long i = 0; i < n; ++i) y[i] = oc_f32_to_f16(x[i]);
}

void oc_host_to_bf16(const float* x, unsigned short* y, long long n) {
  for (long long i = 0; i < n; ++i) y[i] = oc_f32_to_bf16(x[i]);
}

}  // extern "C"
