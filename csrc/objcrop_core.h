// objcrop_core.h -- the single-source body of the fused object-aware crop kernel.
//
// Everything the CUDA kernels in objcrop_kernel.cu compute lives here as plain
// functions marked OC_HD: under nvcc / NVRTC they are __host__ __device__, under
// g++ they are ordinary inline C++ (tests/helpers/csrc/objcrop_host.cpp wraps them for a CPU
// test through ctypes).  So the arithmetic that runs on the GPU is the same
// text that the CPU test compares with dali_objcrop/windows.py (exactly) and
// with dali_objcrop/kernels/reference.py (within 1/255 per pixel).
//
// Contents:
//   * SplitMix64 counter-based RNG, a port of dali_objcrop/rng.py
//   * oc_sample_windows: a per-sample port of windows.sample_windows
//   * oc_sample_local: its local (multi-crop) views (windows._sample_local; the windows operator's)
//   * oc_resample_pixel: antialiased bilinear (triangle filter) resampling of one
//     output pixel of a crop window, flip, normalisation
//   * float -> fp16 / bf16 bit conversions (round to nearest even)
//
// Window maths is float64 with every a*b+c written through oc_mul/oc_add, which
// map to __dmul_rn/__dadd_rn on the device: nvcc would otherwise contract them
// into FMAs and round differently from NumPy.  exp/cos/sin may differ from
// NumPy's by an ulp; that changes a window only if a value lands within ~1e-13
// of a rounding boundary (never seen in the tests' hundreds of thousands of
// samples).
//
// NVRTC has no standard headers, hence no #include when __CUDACC_RTC__ is set.
#ifndef OBJCROP_CORE_H
#define OBJCROP_CORE_H

#if defined(__CUDACC_RTC__)
#define OC_HD __device__ __forceinline__
#elif defined(__CUDACC__)
#include <math.h>
#define OC_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#include <string.h>
#define OC_HD static inline
#endif

typedef unsigned long long oc_u64;
typedef long long oc_i64;

// ---- slot table: must equal dali_objcrop/rng.py ------------------------------
#define OC_SLOT_BOX 0
#define OC_SLOT_SHIFT 1
#define OC_SLOT_VIEW_BASE 2
#define OC_SLOTS_PER_VIEW 16
#define OC_VIEW_TRY 0
#define OC_VIEW_POS 10
#define OC_VIEW_FLIP 11
#define OC_MAX_TRIES 10
#define OC_SLOT_AUG_BASE 40
#define OC_SLOTS_PER_AUG 8
// local (multi-crop) views: view 2 + j is local view j, with its own block of slots
#define OC_SLOT_LOCAL_BASE 64
#define OC_SLOTS_PER_LOCAL 32
#define OC_LOCAL_AUG 16
#define OC_MAX_LOCAL_VIEWS 16

// where local views are drawn (windows.LOCAL_SOURCES)
#define OC_LOCAL_FROM_BOX 0
#define OC_LOCAL_FROM_BOXES 1
#define OC_LOCAL_FROM_SCENE 2

// ---- view kinds and the float64 parameter block (see kernels/common.py) -----
#define OC_KIND_SCENE 0
#define OC_KIND_BOX 1
#define OC_KIND_DILATED 2
#define OC_KIND_SHIFTED 3

#define OC_P_KIND0 0
#define OC_P_KIND1 1
#define OC_P_USES_BOXES 2
#define OC_P_SCALE_LO 3
#define OC_P_SCALE_HI 4
#define OC_P_BOX_LO 5
#define OC_P_BOX_HI 6
#define OC_P_LOG_R0 7
#define OC_P_LOG_R1 8
#define OC_P_RATIO0 9
#define OC_P_RATIO1 10
#define OC_P_DILATE 11
#define OC_P_SHIFT_R0 12
#define OC_P_SHIFT_R1 13
#define OC_P_MIN_BOX 14
#define OC_P_TOP_K 15
#define OC_P_NUM_TRIES 16
#define OC_P_FLIP_P 17
#define OC_NUM_PARAMS 18

#define OC_PI 3.141592653589793

// ---- rounding-exact float64 helpers ------------------------------------------
OC_HD double oc_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

OC_HD double oc_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

OC_HD double oc_clampd(double x, double lo, double hi) {  // np.clip: min(max(x, lo), hi)
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

OC_HD oc_i64 oc_clampi(oc_i64 x, oc_i64 lo, oc_i64 hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

OC_HD oc_i64 oc_floordiv2(oc_i64 a) {  // Python's a // 2
  return (a >= 0) ? a / 2 : -((-a + 1) / 2);
}

// ---- SplitMix64 (rng.py) ------------------------------------------------------
OC_HD oc_u64 oc_mix64(oc_u64 x) {
  oc_u64 z = x + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

OC_HD oc_u64 oc_sample_key(oc_u64 seed, oc_u64 epoch, oc_u64 index) {
  oc_u64 base = oc_mix64(oc_mix64(seed) ^ epoch);
  return oc_mix64(base ^ index);
}

// Two uniforms in [0, 1) of one slot: hi and lo 32-bit halves times 2^-32 (exact).
OC_HD void oc_uniforms(oc_u64 key, int slot, double* u_hi, double* u_lo) {
  oc_u64 h = oc_mix64(key + (oc_u64)slot);
  *u_hi = (double)(h >> 32) * (1.0 / 4294967296.0);
  *u_lo = (double)(h & 0xFFFFFFFFULL) * (1.0 / 4294967296.0);
}

// rng.view_slot: slot of `offset` (OC_VIEW_*) for view `view` (0, 1 global; 2 + j local view j).
OC_HD int oc_view_slot(int view, int offset) {
  return view < 2 ? OC_SLOT_VIEW_BASE + view * OC_SLOTS_PER_VIEW + offset
                  : OC_SLOT_LOCAL_BASE + (view - 2) * OC_SLOTS_PER_LOCAL + offset;
}

// rng.aug_slot: slot of augmentation draw k (0..7) for view `view`.
OC_HD int oc_aug_slot(int view, int k) {
  return view < 2 ? OC_SLOT_AUG_BASE + view * OC_SLOTS_PER_AUG + k
                  : OC_SLOT_LOCAL_BASE + (view - 2) * OC_SLOTS_PER_LOCAL + OC_LOCAL_AUG + k;
}

// ---- windows (windows.py) ----------------------------------------------------
struct OcRect {
  oc_i64 x1, y1, x2, y2;
};

// What oc_sample_windows decides for one sample (mirrors CropWindows).
struct OcSample {
  int win[2][4];     // [x1, y1, x2, y2) per view
  int region[2][4];  // region each view was sampled in
  int flip[2];
  int box_index;     // -1 without a box
  int fallback;      // mode wanted a box, the image had none
  int shift[2];      // obj-obj-shift: (dx, dy), else 0
};

// windows._to_pixels: normalised float64 box -> integer rectangle, >= 1 px.
OC_HD OcRect oc_to_pixels(const double* b, oc_i64 w, oc_i64 h) {
  double dw = (double)w, dh = (double)h;
  double x1 = oc_clampd(floor(oc_mul(b[0], dw)), 0.0, dw - 1.0);
  double y1 = oc_clampd(floor(oc_mul(b[1], dh)), 0.0, dh - 1.0);
  double x2 = oc_clampd(ceil(oc_mul(b[2], dw)), x1 + 1.0, dw);
  double y2 = oc_clampd(ceil(oc_mul(b[3], dh)), y1 + 1.0, dh);
  OcRect r = {(oc_i64)x1, (oc_i64)y1, (oc_i64)x2, (oc_i64)y2};
  return r;
}

// windows._widen on one axis.
OC_HD void oc_widen(oc_i64* lo, oc_i64* hi, oc_i64 size, oc_i64 min_size) {
  oc_i64 len = *hi - *lo;
  oc_i64 target = len > min_size ? len : min_size;
  target = target < size ? target : size;
  oc_i64 new_lo = oc_clampi(oc_floordiv2(*lo + *hi - target), 0, size - target);
  *lo = new_lo;
  *hi = new_lo + target;
}

OC_HD OcRect oc_min_size_region(OcRect r, oc_i64 w, oc_i64 h, oc_i64 min_size) {
  oc_widen(&r.x1, &r.x2, w, min_size);
  oc_widen(&r.y1, &r.y2, h, min_size);
  return r;
}

// windows.random_resized_crop for one sample and one view (torchvision get_params); view 0, 1 global,
// 2 + j local view j (its slots: oc_view_slot).
OC_HD OcRect oc_random_resized_crop(oc_u64 key, int view, OcRect region, double scale_lo, double scale_hi,
                                    const double* p) {
  double rw = (double)(region.x2 - region.x1);
  double rh = (double)(region.y2 - region.y1);
  double area = oc_mul(rw, rh);
  double span = scale_hi - scale_lo;
  double log_r0 = p[OC_P_LOG_R0], log_span = p[OC_P_LOG_R1] - p[OC_P_LOG_R0];
  int num_tries = (int)p[OC_P_NUM_TRIES];
  double cw = 0.0, ch = 0.0;
  int found = 0;
  int base = oc_view_slot(view, 0);  // views 0, 1: OC_SLOT_VIEW_BASE + view * OC_SLOTS_PER_VIEW
  for (int t = 0; t < num_tries && !found; ++t) {
    double u_s, u_r;
    oc_uniforms(key, base + OC_VIEW_TRY + t, &u_s, &u_r);
    double target = oc_mul(area, oc_add(scale_lo, oc_mul(u_s, span)));
    double ar = exp(oc_add(log_r0, oc_mul(u_r, log_span)));
    double tw = rint(sqrt(oc_mul(target, ar)));
    double th = rint(sqrt(target / ar));
    if (tw > 0.0 && th > 0.0 && tw <= rw && th <= rh) {
      cw = tw;
      ch = th;
      found = 1;
    }
  }
  double u_i, u_j;
  oc_uniforms(key, base + OC_VIEW_POS, &u_i, &u_j);
  double top, left;
  if (found) {
    top = floor(oc_mul(u_i, rh - ch + 1.0));
    left = floor(oc_mul(u_j, rw - cw + 1.0));
  } else {  // centre fallback, torchvision semantics
    double in_ratio = rw / rh;
    cw = rw;
    ch = rh;
    if (in_ratio < p[OC_P_RATIO0]) ch = rint(rw / p[OC_P_RATIO0]);
    else if (in_ratio > p[OC_P_RATIO1]) cw = rint(oc_mul(rh, p[OC_P_RATIO1]));
    top = floor((rh - ch) / 2.0);
    left = floor((rw - cw) / 2.0);
  }
  OcRect out;
  out.x1 = region.x1 + (oc_i64)left;
  out.y1 = region.y1 + (oc_i64)top;
  out.x2 = out.x1 + (oc_i64)cw;
  out.y2 = out.y1 + (oc_i64)ch;
  return out;
}

OC_HD void oc_set_rect(int* dst, OcRect r) {
  dst[0] = (int)r.x1;
  dst[1] = (int)r.y1;
  dst[2] = (int)r.x2;
  dst[3] = (int)r.y2;
}

// windows.sample_windows for sample n of a batch.
//   sizes (N, 2) int32 (width, height); boxes (M, 4) float32 normalised;
//   offsets (N + 1,) int64; index (N,) int64; p: the OC_P_* block.
OC_HD OcSample oc_sample_windows(int n, const int* sizes, const float* boxes, const oc_i64* offsets,
                                 const oc_i64* index, oc_u64 seed, oc_u64 epoch, const double* p) {
  OcSample s;
  oc_i64 w = sizes[2 * n], h = sizes[2 * n + 1];
  oc_u64 key = oc_sample_key(seed, epoch, (oc_u64)index[n]);
  int kinds[2] = {(int)p[OC_P_KIND0], (int)p[OC_P_KIND1]};
  int uses_boxes = p[OC_P_USES_BOXES] != 0.0;
  OcRect whole = {0, 0, w, h};
  OcRect regions[2] = {whole, whole};
  oc_i64 count = offsets[n + 1] - offsets[n];
  oc_i64 top_k = (oc_i64)p[OC_P_TOP_K];
  count = count < top_k ? count : top_k;
  int has_box = count > 0;
  oc_i64 min_box = (oc_i64)p[OC_P_MIN_BOX];
  s.box_index = -1;
  s.fallback = uses_boxes && !has_box;
  s.shift[0] = s.shift[1] = 0;
  if (uses_boxes && has_box) {
    double u_box, unused;
    oc_uniforms(key, OC_SLOT_BOX, &u_box, &unused);
    oc_i64 pick = (oc_i64)floor(oc_mul(u_box, (double)count));
    pick = pick < count - 1 ? pick : count - 1;
    s.box_index = (int)pick;
    const float* bf = boxes + 4 * (offsets[n] + pick);
    double b[4] = {(double)bf[0], (double)bf[1], (double)bf[2], (double)bf[3]};
    OcRect b_px = oc_to_pixels(b, w, h);
    regions[0] = oc_min_size_region(b_px, w, h, min_box);
    if (kinds[1] == OC_KIND_BOX) {
      regions[1] = regions[0];
    } else if (kinds[1] == OC_KIND_DILATED) {
      double d = p[OC_P_DILATE];
      double g[4] = {oc_clampd(b[0] + -d, 0.0, 1.0), oc_clampd(b[1] + -d, 0.0, 1.0),
                     oc_clampd(b[2] + d, 0.0, 1.0), oc_clampd(b[3] + d, 0.0, 1.0)};
      regions[1] = oc_min_size_region(oc_to_pixels(g, w, h), w, h, min_box);
    } else if (kinds[1] == OC_KIND_SHIFTED) {
      double u_dir, u_rad;
      oc_uniforms(key, OC_SLOT_SHIFT, &u_dir, &u_rad);
      double r0 = p[OC_P_SHIFT_R0], r1 = p[OC_P_SHIFT_R1];
      double radius = oc_add(r0, oc_mul(u_rad, r1 - r0));
      double theta = oc_mul(2.0 * OC_PI, u_dir);
      oc_i64 dx = (oc_i64)floor(oc_add(oc_mul(radius, cos(theta)), 0.5));
      oc_i64 dy = (oc_i64)floor(oc_add(oc_mul(radius, sin(theta)), 0.5));
      // translate back inside the image where the move would leave it
      dx = oc_clampi(dx, -b_px.x1, w - b_px.x2);
      dy = oc_clampi(dy, -b_px.y1, h - b_px.y2);
      OcRect moved = {b_px.x1 + dx, b_px.y1 + dy, b_px.x2 + dx, b_px.y2 + dy};
      regions[1] = oc_min_size_region(moved, w, h, min_box);
      s.shift[0] = (int)dx;
      s.shift[1] = (int)dy;
    }
  }
  double box_lo = p[OC_P_BOX_LO], box_hi = p[OC_P_BOX_HI];
  for (int v = 0; v < 2; ++v) {
    int object_view = uses_boxes && has_box && kinds[v] != OC_KIND_SCENE;
    double s_lo = object_view ? box_lo : p[OC_P_SCALE_LO];
    double s_hi = object_view ? box_hi : p[OC_P_SCALE_HI];
    OcRect win = oc_random_resized_crop(key, v, regions[v], s_lo, s_hi, p);
    oc_set_rect(s.win[v], win);
    oc_set_rect(s.region[v], regions[v]);
    double u_f, unused;
    oc_uniforms(key, OC_SLOT_VIEW_BASE + v * OC_SLOTS_PER_VIEW + OC_VIEW_FLIP, &u_f, &unused);
    s.flip[v] = u_f < p[OC_P_FLIP_P];
  }
  return s;
}

// Store sample n's windows in the windows kernel's output layout (shared by the
// CUDA windows kernel and the host build, so both write the same arrays).
OC_HD void oc_store_sample(int n, const OcSample& s, int* windows, int* regions, unsigned char* flips,
                           int* box_index, unsigned char* fallback, int* shift) {
  for (int v = 0; v < 2; ++v) {
    for (int k = 0; k < 4; ++k) {
      windows[(n * 2 + v) * 4 + k] = s.win[v][k];
      regions[(n * 2 + v) * 4 + k] = s.region[v][k];
    }
    flips[n * 2 + v] = (unsigned char)s.flip[v];
    shift[n * 2 + v] = s.shift[v];
  }
  box_index[n] = s.box_index;
  fallback[n] = (unsigned char)s.fallback;
}

// What oc_sample_local decides for one local view (mirrors CropWindows.local_*).
struct OcLocal {
  int win[4];     // [x1, y1, x2, y2)
  int region[4];  // the region it was sampled in
  int flip;
  int box_index;  // the proposal it was drawn in (-1: none, or local_from scene)
};

// windows._sample_local for local view j (0 <= j < OC_MAX_LOCAL_VIEWS) of sample n: RandomResizedCrop with
// scale (local_lo, local_hi) of its region (local_from: OC_LOCAL_FROM_*) on the slots of view 2 + j.
//   s: oc_sample_windows of the same sample and arguments (its regions and proposal); key: the sample's
//   key (oc_sample_key); the other arguments as oc_sample_windows.
// Not used by the CUDA kernels (two views); the windows operator (csrc/dali/windows_op.cc) calls it.
OC_HD OcLocal oc_sample_local(int n, int j, const OcSample& s, int local_from, double local_lo, double local_hi,
                              const int* sizes, const float* boxes, const oc_i64* offsets, oc_u64 key,
                              const double* p) {
  OcLocal l;
  oc_i64 w = sizes[2 * n], h = sizes[2 * n + 1];
  OcRect region = {0, 0, w, h};  // scene, and every source on an image without proposals
  l.box_index = -1;
  if (local_from == OC_LOCAL_FROM_BOX) {
    // the union of the global object views' regions (each the whole image where there is no box)
    int kinds[2] = {(int)p[OC_P_KIND0], (int)p[OC_P_KIND1]};
    int first = -1, last = -1;
    for (int v = 0; v < 2; ++v) {
      if (kinds[v] != OC_KIND_SCENE) {
        if (first < 0) first = v;
        last = v;
      }
    }
    if (first >= 0) {
      const int* a = s.region[first];
      const int* b = s.region[last];
      region.x1 = a[0] < b[0] ? a[0] : b[0];
      region.y1 = a[1] < b[1] ? a[1] : b[1];
      region.x2 = a[2] > b[2] ? a[2] : b[2];
      region.y2 = a[3] > b[3] ? a[3] : b[3];
    }
    l.box_index = s.box_index;
  } else if (local_from == OC_LOCAL_FROM_BOXES) {
    // proposal (b + j) mod k: local view 0 on the global views' proposal, the others on the next ones
    oc_i64 count = offsets[n + 1] - offsets[n];
    oc_i64 top_k = (oc_i64)p[OC_P_TOP_K];
    count = count < top_k ? count : top_k;
    if (count > 0) {
      oc_i64 b0 = s.box_index > 0 ? (oc_i64)s.box_index : 0;
      oc_i64 pick = (b0 + j) % count;
      const float* bf = boxes + 4 * (offsets[n] + pick);
      double b[4] = {(double)bf[0], (double)bf[1], (double)bf[2], (double)bf[3]};
      region = oc_min_size_region(oc_to_pixels(b, w, h), w, h, (oc_i64)p[OC_P_MIN_BOX]);
      l.box_index = (int)pick;
    }
  }
  OcRect win = oc_random_resized_crop(key, 2 + j, region, local_lo, local_hi, p);
  oc_set_rect(l.win, win);
  oc_set_rect(l.region, region);
  double u_f, unused;
  oc_uniforms(key, oc_view_slot(2 + j, OC_VIEW_FLIP), &u_f, &unused);
  l.flip = u_f < p[OC_P_FLIP_P];
  return l;
}

// ---- resampling ---------------------------------------------------------------
// One axis of the filter for output coordinate o (0..out-1) of window [lo, hi):
// source centre c = lo + (o + 0.5) * scale - 0.5 with scale = (hi - lo) / out,
// triangle filter of radius support = max(scale, 1) (plain bilinear when
// enlarging, area-like antialiasing when shrinking, as PIL's BILINEAR), taps
// clipped to the window (crop-then-resize semantics), weights normalised.
struct OcAxis {
  float c, inv_support;
  int t0, t1;  // inclusive tap range
};

OC_HD OcAxis oc_axis(int o, int lo, int hi, int out) {
  OcAxis a;
  float scale = (float)(hi - lo) / (float)out;
  float support = scale > 1.0f ? scale : 1.0f;
  a.inv_support = 1.0f / support;
  a.c = (float)lo + ((float)o + 0.5f) * scale - 0.5f;
  int t0 = (int)ceilf(a.c - support), t1 = (int)floorf(a.c + support);
  a.t0 = t0 > lo ? t0 : lo;
  a.t1 = t1 < hi - 1 ? t1 : hi - 1;
  return a;
}

OC_HD float oc_tap(const OcAxis& a, int t) {
  float wgt = 1.0f - fabsf((float)t - a.c) * a.inv_support;
  return wgt > 0.0f ? wgt : 0.0f;
}

// Output pixel (ox, oy) of an out x out view cut from window win of an HWC uint8
// RGB image of width img_w; writes 3 channel values in pixel units (0..255).
OC_HD void oc_resample_pixel(const unsigned char* img, int img_w, const int* win, int flip, int out, int ox,
                             int oy, float* rgb) {
  OcAxis ax = oc_axis(flip ? out - 1 - ox : ox, win[0], win[2], out);
  OcAxis ay = oc_axis(oy, win[1], win[3], out);
  float wsx = 0.0f;
  for (int x = ax.t0; x <= ax.t1; ++x) wsx += oc_tap(ax, x);
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, wsy = 0.0f;
  for (int y = ay.t0; y <= ay.t1; ++y) {
    float wy = oc_tap(ay, y);
    if (wy <= 0.0f) continue;
    const unsigned char* row = img + ((oc_i64)y * img_w) * 3;
    float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
    for (int x = ax.t0; x <= ax.t1; ++x) {
      float wx = oc_tap(ax, x);
      const unsigned char* px = row + 3 * x;
      r0 += wx * (float)px[0];
      r1 += wx * (float)px[1];
      r2 += wx * (float)px[2];
    }
    acc0 += wy * r0;
    acc1 += wy * r1;
    acc2 += wy * r2;
    wsy += wy;
  }
  float norm = wsx * wsy;
  norm = norm > 0.0f ? 1.0f / norm : 0.0f;
  rgb[0] = acc0 * norm;
  rgb[1] = acc1 * norm;
  rgb[2] = acc2 * norm;
}

// ---- output conversions (round to nearest even, NaN kept) ----------------------
OC_HD unsigned char oc_to_u8(float v) {
  v = rintf(v);
  return (unsigned char)(v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v));
}

OC_HD unsigned int oc_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  unsigned int u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

OC_HD unsigned short oc_f32_to_bf16(float f) {
  unsigned int x = oc_f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (unsigned short)(x >> 16);
}

OC_HD unsigned short oc_f32_to_f16(float f) {
  unsigned int x = oc_f32_bits(f);
  unsigned int sign = (x >> 16) & 0x8000u;
  unsigned int absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);  // NaN
  if (absx >= 0x47800000u) return (unsigned short)(sign | 0x7c00u);  // >= 65536 (and inf) -> inf
  if (absx < 0x38800000u) {                                          // below 2^-14: subnormal or 0
    if (absx < 0x33000000u) return (unsigned short)sign;             // below 2^-25
    unsigned int e = absx >> 23;
    unsigned int mant = (absx & 0x7fffffu) | 0x800000u;
    unsigned int shift = 126u - e;
    unsigned int m = mant >> shift;
    unsigned int rem = mant & ((1u << shift) - 1u);
    unsigned int half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return (unsigned short)(sign | m);
  }
  unsigned int hbits = (((absx >> 23) - 112u) << 10) | ((absx & 0x7fffffu) >> 13);
  unsigned int rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (hbits & 1u))) ++hbits;  // carry may reach inf: correct
  return (unsigned short)(sign | hbits);
}

#endif  // OBJCROP_CORE_H
