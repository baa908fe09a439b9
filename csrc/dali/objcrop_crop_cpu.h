// objcrop_crop_cpu.h -- the CPU backend's arithmetic of fn.objcrop.crop, one view at a time (no DALI).
//
// The resampling is oc_resample_pixel's arithmetic done separably (each output pixel's horizontal sums are
// formed per source row once and the vertical sums then run over them, in the same order and with the same
// float32 weights as the per-pixel CUDA path, see resample_view); colour, blur taps, reflect-101 borders,
// solarise, normalise and the float16 / bfloat16 conversions are the OC_HD functions of objcrop_augment.h /
// ../objcrop_core.h.  Used by the CPU operator (objcrop_crop.cc) and by the standalone kernel check
// (csrc/check/crop_check.cpp), which compares the GPU kernels with it.  g++ / clang only (vector extensions).
#ifndef OBJCROP_CROP_CPU_H
#define OBJCROP_CROP_CPU_H

#include <algorithm>
#include <cstring>
#include <vector>

#include "objcrop_augment.h"

namespace objcrop {

// Per-thread work buffers (reused across batches, so the large blocks are not re-mapped per view).
struct CpuBuffers {
  std::vector<float> src;       // one source row of the window as float: (window width, 3)
  std::vector<float> rows;      // horizontal sums: (window height, S, 3)
  std::vector<float> view;      // (S, S, 3) pixel units
  std::vector<float> tmp;       // (S, S, 3) after the horizontal blur
  std::vector<float> plane;     // (S, S) one normalised output channel
  std::vector<int> tap_start;   // per output x: first tap, number of taps, offset into tap_w
  std::vector<int> tap_count;
  std::vector<int> tap_off;
  std::vector<float> tap_w;
  std::vector<float> wsx;
};

// d[j] += w * s[j] for j < n, 8 lanes at a time (GCC / Clang vector extensions: the -O2 build does not
// auto-vectorise loops of unknown length).  Same multiply and add per element as the scalar loop.
inline void axpy(float *__restrict d, const float *__restrict s, float w, int n) {
  typedef float v8 __attribute__((vector_size(32)));
  const v8 wv = {w, w, w, w, w, w, w, w};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    v8 a, b;
    std::memcpy(&a, d + j, sizeof a);
    std::memcpy(&b, s + j, sizeof b);
    a += wv * b;
    std::memcpy(d + j, &a, sizeof a);
  }
  for (; j < n; ++j) d[j] += w * s[j];
}

// Resample one view into b.view (HWC float, pixel units): equal, operation for operation, to
// oc_resample_pixel on every output pixel.
inline void resample_view(const OcViewParams &p, int S, CpuBuffers &b) {
  const unsigned char *img = reinterpret_cast<const unsigned char *>(p.image);
  const int x1 = p.win[0], y1 = p.win[1], x2 = p.win[2], y2 = p.win[3];
  b.tap_start.resize(S);
  b.tap_count.resize(S);
  b.tap_off.resize(S);
  b.wsx.resize(S);
  b.tap_w.clear();
  for (int o = 0; o < S; ++o) {
    OcAxis ax = oc_axis(p.flip ? S - 1 - o : o, x1, x2, S);
    b.tap_start[o] = ax.t0;
    b.tap_count[o] = std::max(0, ax.t1 - ax.t0 + 1);
    b.tap_off[o] = static_cast<int>(b.tap_w.size());
    float ws = 0.0f;
    for (int x = ax.t0; x <= ax.t1; ++x) {
      float w = oc_tap(ax, x);
      b.tap_w.push_back(w);
      ws += w;
    }
    b.wsx[o] = ws;
  }
  const int wh = y2 - y1, row_len = 3 * S;
  b.rows.resize(static_cast<size_t>(wh) * row_len);
  const int ww = x2 - x1;
  b.src.resize(3 * static_cast<size_t>(ww));
  for (int y = y1; y < y2; ++y) {
    // the window's part of the source row as float once (exact), then the per-output tap sums
    const unsigned char *__restrict row = img + (static_cast<oc_i64>(y) * p.img_w + x1) * 3;
    float *__restrict srcf = b.src.data();
    for (int j = 0; j < 3 * ww; ++j) srcf[j] = static_cast<float>(row[j]);
    float *dst = b.rows.data() + static_cast<size_t>(y - y1) * row_len;
    for (int o = 0; o < S; ++o) {
      const float *w = b.tap_w.data() + b.tap_off[o];
      const float *px = srcf + 3 * (b.tap_start[o] - x1);
      float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
      for (int k = 0, n = b.tap_count[o]; k < n; ++k, px += 3) {
        r0 += w[k] * px[0];
        r1 += w[k] * px[1];
        r2 += w[k] * px[2];
      }
      dst[3 * o] = r0;
      dst[3 * o + 1] = r1;
      dst[3 * o + 2] = r2;
    }
  }
  b.view.assign(static_cast<size_t>(S) * row_len, 0.0f);
  for (int oy = 0; oy < S; ++oy) {
    OcAxis ay = oc_axis(oy, y1, y2, S);
    float *__restrict acc = b.view.data() + static_cast<size_t>(oy) * row_len;
    float wsy = 0.0f;
    for (int y = ay.t0; y <= ay.t1; ++y) {
      float wy = oc_tap(ay, y);
      if (wy <= 0.0f) continue;
      axpy(acc, b.rows.data() + static_cast<size_t>(y - y1) * row_len, wy, row_len);
      wsy += wy;
    }
    for (int o = 0; o < S; ++o) {
      float norm = b.wsx[o] * wsy;
      norm = norm > 0.0f ? 1.0f / norm : 0.0f;
      for (int c = 0; c < 3; ++c) acc[3 * o + c] *= norm;
    }
  }
}

// Colour, blur (x then y, reflect-101), solarise, normalise, store (3, S, S).
inline void augment_view(const OcViewParams &p, const float *taps, const float *norm, int S, int out_kind, CpuBuffers &b) {
  const size_t npix = static_cast<size_t>(S) * S;
  float *view = b.view.data();
  if (p.do_colour)
    for (size_t i = 0; i < npix; ++i) oc_apply_colour(p.colour, view + 3 * i);
  const float *src = view;
  if (p.blur_size) {
    const int k = p.blur_size, half = k / 2, row_len = 3 * S;
    b.tmp.resize(npix * 3);
    // interior columns [half, S - half): every tap inside the row, so element j = 3x + c sums
    // taps[t] * line[j + 3 (t - half)] over t in order (oc_blur_at's sums), vectorisable over j
    const int in_lo = std::min(half, S), in_hi = std::max(in_lo, S - half);
    for (int y = 0; y < S; ++y) {  // along x
      const float *__restrict line = view + static_cast<size_t>(y) * row_len;
      float *__restrict dst = b.tmp.data() + static_cast<size_t>(y) * row_len;
      for (int x = 0; x < S; ++x) {
        if (x == in_lo && in_hi > in_lo) x = in_hi;  // the interior is done below
        if (x >= S) break;
        for (int c = 0; c < 3; ++c) dst[3 * x + c] = oc_blur_at(line + c, 3, S, x, taps, k);
      }
      if (in_hi > in_lo) {
        float *__restrict d = dst + 3 * in_lo;
        const int len = 3 * (in_hi - in_lo);
        std::fill(d, d + len, 0.0f);
        for (int t = 0; t < k; ++t) axpy(d, line + 3 * (in_lo + t - half), taps[t], len);
      }
    }
    for (int y = 0; y < S; ++y) {  // along y, rows accumulated in tap order (as oc_blur_at)
      float *__restrict acc = view + static_cast<size_t>(y) * row_len;
      std::fill(acc, acc + row_len, 0.0f);
      for (int t = 0; t < k; ++t)
        axpy(acc, b.tmp.data() + static_cast<size_t>(oc_reflect101(y + t - half, S)) * row_len, taps[t], row_len);
    }
    src = view;
  }
  // solarise, normalise, store plane by plane (branches hoisted out of the pixel loops)
  for (int c = 0; c < 3; ++c) {
    const float *__restrict s = src + c;
    b.plane.resize(npix);
    float *__restrict f = b.plane.data();
    if (p.do_solarize) {
      for (size_t i = 0; i < npix; ++i) f[i] = oc_normalize(oc_solarize(s[3 * i]), norm, c);
    } else {
      for (size_t i = 0; i < npix; ++i) f[i] = oc_normalize(s[3 * i], norm, c);
    }
    if (out_kind == OC_OUT_F32) {
      std::memcpy(reinterpret_cast<float *>(p.out) + c * npix, f, npix * sizeof(float));
    } else {
      unsigned short *o = reinterpret_cast<unsigned short *>(p.out) + c * npix;
      if (out_kind == OC_OUT_F16)
        for (size_t i = 0; i < npix; ++i) o[i] = oc_f32_to_f16(f[i]);
      else
        for (size_t i = 0; i < npix; ++i) o[i] = oc_f32_to_bf16(f[i]);
    }
  }
}

}  // namespace objcrop

#endif  // OBJCROP_CROP_CPU_H
