// objcrop_crop.cc -- schema of objcrop__Crop (fn.objcrop.crop) and its CPU backend.
//
// CPU: one task per (sample, view) on DALI's thread pool.  The resampling is oc_resample_pixel's
// arithmetic done separably (each output pixel's horizontal sums are formed per source row once and the
// vertical sums then run over them, in the same order and with the same float32 weights as the per-pixel
// CUDA path, see resample_view); colour, blur taps, reflect-101 borders, solarise, normalise and the
// float16 / bfloat16 conversions are the OC_HD functions of objcrop_augment.h / ../objcrop_core.h.
#include <algorithm>
#include <cstring>
#include <vector>

#include "objcrop_crop.h"

namespace objcrop {
namespace {

// Per-thread work buffers (reused across batches, so the large blocks are not re-mapped per view).
struct Buffers {
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

// Resample one view into b.view (HWC float, pixel units): equal, operation for operation, to
// oc_resample_pixel on every output pixel.
void resample_view(const OcViewParams &p, int S, Buffers &b) {
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
  for (int y = y1; y < y2; ++y) {
    const unsigned char *src = img + (static_cast<oc_i64>(y) * p.img_w) * 3;
    float *dst = b.rows.data() + static_cast<size_t>(y - y1) * row_len;
    for (int o = 0; o < S; ++o) {
      const float *w = b.tap_w.data() + b.tap_off[o];
      const unsigned char *px = src + 3 * b.tap_start[o];
      float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
      for (int k = 0, n = b.tap_count[o]; k < n; ++k, px += 3) {
        r0 += w[k] * static_cast<float>(px[0]);
        r1 += w[k] * static_cast<float>(px[1]);
        r2 += w[k] * static_cast<float>(px[2]);
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
      const float *__restrict r = b.rows.data() + static_cast<size_t>(y - y1) * row_len;
      for (int j = 0; j < row_len; ++j) acc[j] += wy * r[j];
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
void augment_view(const OcViewParams &p, const float *taps, const float *norm, int S, int out_kind, Buffers &b) {
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
        for (int t = 0; t < k; ++t) {
          const float *__restrict s = line + 3 * (in_lo + t - half);
          const float w = taps[t];
          for (int j = 0; j < len; ++j) d[j] += w * s[j];
        }
      }
    }
    for (int y = 0; y < S; ++y) {  // along y, rows accumulated in tap order (as oc_blur_at)
      float *__restrict acc = view + static_cast<size_t>(y) * row_len;
      std::fill(acc, acc + row_len, 0.0f);
      for (int t = 0; t < k; ++t) {
        const float *__restrict r = b.tmp.data() + static_cast<size_t>(oc_reflect101(y + t - half, S)) * row_len;
        const float w = taps[t];
        for (int j = 0; j < row_len; ++j) acc[j] += w * r[j];
      }
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

}  // namespace

template <>
void ObjCropCrop<dali::CPUBackend>::RunImpl(dali::Workspace &ws) {
  const auto &images = ws.Input<dali::CPUBackend>(0);
  auto &out0 = ws.Output<dali::CPUBackend>(0);
  auto &out1 = ws.Output<dali::CPUBackend>(1);
  out0.SetLayout("CHW");
  out1.SetLayout("CHW");
  const int n = images.num_samples();
  auto &pool = ws.GetThreadPool();
  static thread_local Buffers tls;  // DALI's pool threads live as long as the pipeline
  for (int i = 0; i < n; ++i) {
    for (int v = 0; v < 2; ++v) {
      OcViewParams &p = params_[2 * i + v];
      p.image = reinterpret_cast<unsigned long long>(images.raw_tensor(i));
      p.out = reinterpret_cast<unsigned long long>((v == 0 ? out0 : out1).raw_mutable_tensor(i));
      const oc_i64 cost = static_cast<oc_i64>(p.win[3] - p.win[1]) * size_ + static_cast<oc_i64>(size_) * size_;
      pool.AddWork([this, i, v](int) {
        const OcViewParams &q = params_[2 * i + v];
        resample_view(q, size_, tls);
        augment_view(q, taps_.data() + q.blur_offset, norm_, size_, out_kind_, tls);
      }, cost);
    }
  }
  pool.RunAll();
}

}  // namespace objcrop

namespace dali {  // DALI's registration macros name CPUBackend etc. unqualified

DALI_SCHEMA(objcrop__Crop)
    .DocStr(R"(Fused object-aware crop and augmentation of two views (dali_objcrop).

For each sample, both views are cut from the decoded image by their windows and resized to
``size`` x ``size`` with an antialiased triangle filter (crop-then-resize, PIL BILINEAR semantics),
mirrored where ``flip`` says so, colour-jittered with ``fn.color_twist``'s formula (grayscale is
saturation 0) and clamped to [0, 255], blurred with a separable Gaussian (``fn.filter``'s reflect-101
border), solarised and normalised as ``(x - mean) / std`` in pixel units, in one pass.  The draws come
from ``fn.objcrop.windows`` (or ``dali_objcrop.augment.sample_aug_params``).

Outputs: the two views, each (3, size, size) per sample (layout CHW), float32, float16, or bfloat16
carried as uint16 bit patterns (DALI 2.4 has no bfloat16 type; in torch: ``.view(torch.bfloat16)``).)")
    .NumInput(4)
    .NumOutput(2)
    .InputDox(0, "images", "TensorList", "Decoded images, HWC uint8 RGB (the ROI the windows refer to).")
    .InputDox(1, "windows", "TensorList", "(2, 4) int32 per sample: [x1, y1, x2, y2) of each view in the image.")
    .InputDox(2, "flip", "TensorList", "(2,) uint8 per sample: mirror the view horizontally.")
    .InputDox(3, "aug", "TensorList",
              "(2, 9) float32 per sample, per view: colour_applied, brightness, contrast, saturation, "
              "hue_degrees, blur_applied, sigma, blur_window, solarize_applied.")
    .InputDevice(1, 4, InputDevice::CPU)
    .AddArg("size", "Output side in pixels (square views).", DALI_INT32)
    .AddOptionalArg("mean", "Per-channel mean in pixel units (0..255), one value or three.",
                    std::vector<float>{0.0f, 0.0f, 0.0f})
    .AddOptionalArg("std", "Per-channel standard deviation in pixel units, one value or three.",
                    std::vector<float>{1.0f, 1.0f, 1.0f})
    .AddOptionalArg("dtype", "Output type: 'float32', 'float16' or 'bfloat16' (as uint16 bits).",
                    std::string("float32"))
    .AddOptionalArg("contrast_center",
                    "Contrast pivot of the colour twist: 128 (default) is fn.color_twist on uint8 images "
                    "(mid-grey); 0.5 reproduces fn.color_twist on float images holding 0..255 values.",
                    128.0f);

DALI_REGISTER_OPERATOR(objcrop__Crop, objcrop::ObjCropCrop<CPUBackend>, CPU);

}  // namespace dali
