// objcrop_augment.h -- the per-pixel augmentation arithmetic of the fused crop operator.
//
// Shared by the CPU backend (objcrop_crop.cc, g++) and the CUDA kernels (objcrop_crop_kernels.h,
// nvcc): every function is OC_HD (see ../objcrop_core.h).  The NumPy specification is
// dali_objcrop/kernels/reference.py (augment_views_reference); the semantics are those of the DALI
// operators the loader's "dali" graph chains:
//
//   colour   fn.color_twist: out = M x + o with
//              M = b * c * Yiq2Rgb * Hue(h) * Sat(s) * Rgb2Yiq,  o = (p - p * c) * b  (every channel)
//            where p is the contrast pivot ("half range": DALI uses 128 for integer inputs, 0.5 for
//            float inputs); grayscale is saturation 0; then clamped to [0, 255]
//   blur     two fn.filter passes (x, then y) with the 1-D Gaussian of augment.gaussian_kernels
//            (2 * ceil(3 sigma) + 1 taps, normalised in float64, stored float32), fn.filter's default
//            border "reflect_101" (dcb|abcd|cba), accumulated in float32
//   solarise x >= 128 -> 255 - x
//   normalise (x - mean) * (1 / std) in pixel units, as fn.crop_mirror_normalize
//
// The per-view draws arrive as the 9 columns of the windows operator's `aug` output
// (docs/plugin.md): OC_AUG_* below.
#ifndef OBJCROP_AUGMENT_H
#define OBJCROP_AUGMENT_H

#include "../objcrop_core.h"

// ---- columns of the per-view draws (augment.sample_aug_params, docs/plugin.md) --------------------
#define OC_AUG_COLOUR 0      // jitter or grayscale applied (0/1)
#define OC_AUG_BRIGHTNESS 1  // factor (1 where not jittered)
#define OC_AUG_CONTRAST 2    // factor (1 where not jittered)
#define OC_AUG_SATURATION 3  // factor (0 where grayscale)
#define OC_AUG_HUE 4         // degrees
#define OC_AUG_BLUR 5        // blur applied (0/1)
#define OC_AUG_SIGMA 6       // Gaussian sigma in output pixels
#define OC_AUG_BLUR_WINDOW 7 // odd number of taps, 2 * ceil(3 sigma) + 1 (computed from float64 sigma)
#define OC_AUG_SOLARIZE 8    // solarise applied (0/1)
#define OC_AUG_K 9

// Taps per blur pass at most (a wider window is refused by name, not run for hours): the recipes' windows are
// 2 * ceil(3 sigma) + 1, 13 taps for sigma 2.
#define OC_MAX_BLUR_WINDOW 1023

// ---- colour -------------------------------------------------------------------------------------
// 3x3 (row-major) times 3x3, double.
OC_HD void oc_mat3_mul(const double* a, const double* b, double* out) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) out[3 * i + j] = a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j];
}

// The colour-twist transform of one view: m[0..8] the 3x3 matrix (row-major, acting on RGB column
// vectors), m[9..11] the offset.  Computed in double (DALI builds it in float: the two differ by
// ~1e-7 relative, far below a pixel level).  hue in degrees; center = the contrast pivot.
OC_HD void oc_colour_matrix(double brightness, double contrast, double saturation, double hue_deg,
                            double center, float* m) {
  const double rgb2yiq[9] = {0.299, 0.587, 0.114, 0.596, -0.274, -0.321, 0.211, -0.523, 0.311};
  // inverse of rgb2yiq by the adjugate (DALI: inverse(Rgb2Yiq))
  const double* a = rgb2yiq;
  double inv[9] = {a[4] * a[8] - a[5] * a[7], a[2] * a[7] - a[1] * a[8], a[1] * a[5] - a[2] * a[4],
                   a[5] * a[6] - a[3] * a[8], a[0] * a[8] - a[2] * a[6], a[2] * a[3] - a[0] * a[5],
                   a[3] * a[7] - a[4] * a[6], a[1] * a[6] - a[0] * a[7], a[0] * a[4] - a[1] * a[3]};
  double det = a[0] * inv[0] + a[1] * inv[3] + a[2] * inv[6];
  for (int k = 0; k < 9; ++k) inv[k] /= det;
  double h = hue_deg * OC_PI / 180.0;
  // hue: a rotation in the IQ plane; saturation: a scaling of IQ
  double hs[9] = {1.0, 0.0, 0.0,
                  0.0, cos(h) * saturation, sin(h) * saturation,
                  0.0, -sin(h) * saturation, cos(h) * saturation};
  double t[9], u[9];
  oc_mat3_mul(hs, rgb2yiq, t);
  oc_mat3_mul(inv, t, u);
  double bc = brightness * contrast;
  for (int k = 0; k < 9; ++k) m[k] = (float)(bc * u[k]);
  float off = (float)((center - center * contrast) * brightness);
  m[9] = m[10] = m[11] = off;
}

// rgb <- clamp(M rgb + o, 0, 255), in float (fn.color_twist, then the graph's clamp).
OC_HD void oc_apply_colour(const float* m, float* rgb) {
  float r = rgb[0], g = rgb[1], b = rgb[2];
  for (int c = 0; c < 3; ++c) {
    float v = m[3 * c] * r + m[3 * c + 1] * g + m[3 * c + 2] * b + m[9 + c];
    rgb[c] = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
  }
}

// ---- blur ---------------------------------------------------------------------------------------
// fn.filter's default border "reflect_101" (OpenCV BORDER_REFLECT_101): index i of a line of n, in closed
// form (the reflection is periodic with period 2n - 2), so a window far wider than the line costs no loop.
OC_HD int oc_reflect101(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * n - 2;
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// The normalised 1-D Gaussian of augment.gaussian_kernels: taps[k] for k < size, centred on size / 2,
// exp in double, normalised in double, stored as float.
OC_HD void oc_gaussian_taps(double sigma, int size, float* taps) {
  double sum = 0.0;
  int half = size / 2;
  for (int k = 0; k < size; ++k) {
    double x = (double)(k - half) / sigma;
    sum += exp(-0.5 * x * x);
  }
  for (int k = 0; k < size; ++k) {
    double x = (double)(k - half) / sigma;
    taps[k] = (float)(exp(-0.5 * x * x) / sum);
  }
}

// One channel value of a blurred line: sum_k taps[k] * line[reflect(i + k - size/2)] where element j of
// the line is line[j * stride] (a correlation, as fn.filter; the kernel is symmetric anyway).
OC_HD float oc_blur_at(const float* line, int stride, int n, int i, const float* taps, int size) {
  int half = size / 2;
  float acc = 0.0f;
  if (i - half >= 0 && i + half < n) {  // interior: no border (same sums, in the same order)
    const float* p = line + (oc_i64)(i - half) * stride;
    for (int k = 0; k < size; ++k) acc += taps[k] * p[(oc_i64)k * stride];
    return acc;
  }
  for (int k = 0; k < size; ++k) acc += taps[k] * line[(oc_i64)oc_reflect101(i + k - half, n) * stride];
  return acc;
}

// ---- solarise, normalise, store ---------------------------------------------------------------------
OC_HD float oc_solarize(float v) { return v >= 128.0f ? 255.0f - v : v; }

// norm: mean[3], 1/std[3] in pixel units (kernels/common.py: norm_params).
OC_HD float oc_normalize(float v, const float* norm, int c) { return (v - norm[c]) * norm[3 + c]; }

#define OC_OUT_F32 0
#define OC_OUT_F16 1
#define OC_OUT_BF16 2

// Store v at element i of an output buffer of kind OC_OUT_* (float16 / bfloat16 round to nearest even).
OC_HD void oc_store_out(void* out, oc_i64 i, float v, int kind) {
  if (kind == OC_OUT_F32) ((float*)out)[i] = v;
  else if (kind == OC_OUT_F16) ((unsigned short*)out)[i] = oc_f32_to_f16(v);
  else ((unsigned short*)out)[i] = oc_f32_to_bf16(v);
}

// ---- the per-view parameter block (host-built, read by both backends) -------------------------------
struct OcViewParams {
  float colour[12];              // oc_colour_matrix
  unsigned long long image;      // address of the HWC uint8 RGB image
  unsigned long long out;        // address of this view's (3, size, size) output
  long long scratch;             // GPU: first float of this view's size x size x 3 rows in the blur scratch
                                 // buffer (-1: not blurred)
  int size;                      // this view's output side S (global and local views differ)
  int img_w, img_h;
  int win[4];                    // [x1, y1, x2, y2) inside the image
  int flip;
  int do_colour, do_solarize;
  int blur_size;                 // 0: no blur; else the odd number of taps
  int blur_offset;               // first tap in the batch's tap array
};

// Fill the colour / blur / solarise fields of p from one row of `aug` (OC_AUG_K floats).  Returns 0,
// or the number (1-based) of the first invalid column: blur_window must be odd, in [1, OC_MAX_BLUR_WINDOW],
// and sigma > 0 when the blur is applied.
OC_HD int oc_view_from_aug(const float* aug, double contrast_center, OcViewParams* p) {
  p->do_colour = aug[OC_AUG_COLOUR] != 0.0f;
  if (p->do_colour)
    oc_colour_matrix(aug[OC_AUG_BRIGHTNESS], aug[OC_AUG_CONTRAST], aug[OC_AUG_SATURATION], aug[OC_AUG_HUE],
                     contrast_center, p->colour);
  else
    for (int k = 0; k < 12; ++k) p->colour[k] = (k % 4 == 0 && k < 9) ? 1.0f : 0.0f;
  p->blur_size = 0;
  if (aug[OC_AUG_BLUR] != 0.0f) {
    float w = aug[OC_AUG_BLUR_WINDOW];
    if (!(aug[OC_AUG_SIGMA] > 0.0f)) return OC_AUG_SIGMA + 1;
    if (!(w >= 1.0f && w <= (float)OC_MAX_BLUR_WINDOW) || (float)(int)w != w || ((int)w) % 2 == 0)
      return OC_AUG_BLUR_WINDOW + 1;
    p->blur_size = (int)w;
  }
  p->do_solarize = aug[OC_AUG_SOLARIZE] != 0.0f;
  return 0;
}

#endif  // OBJCROP_AUGMENT_H
