// objcrop_crop_plan.h -- the GPU backend's host-side launch plan of fn.objcrop.crop, free of DALI and CUDA.
//
// Everything the GPU RunImpl decides before it launches lives here, so that three callers share one text:
//   * the DALI operator (objcrop_crop.h SetupImpl: the per-view blocks; objcrop_crop_gpu.cc RunImpl: addresses,
//     scratch slots, grids, shared memory, the packed block copied to the device, objcrop_crop_launch.h),
//   * the standalone kernel check (csrc/check/: the real kernels with this plan on a GPU, no DALI),
//   * the CPU emulator of the kernels (csrc/check/crop_emulate.cpp: walks the plan's grids serially).
//
// Limits (oc_check_limits: refused by name in the GPU operator's constructor, so when the pipeline is
// built, and again per batch by oc_plan_finish):
//   OC_MAX_SIZE         the row kernel keeps one output row of 3 x S floats in shared memory: 4096 px is
//                       48 KiB, the amount every GPU from sm_75 up gives a block without an opt-in
//   OC_MAX_BATCH        the row kernel's grid is (S, 2, N): gridDim.z <= 65535
//   OC_MAX_BLUR_WINDOW  taps per blur pass (objcrop_augment.h)
#ifndef OBJCROP_CROP_PLAN_H
#define OBJCROP_CROP_PLAN_H

#include <stddef.h>
#include <string.h>

#include <string>
#include <vector>

#include "objcrop_augment.h"

#define OC_ROW_THREADS 128
#define OC_COL_THREADS 256
#define OC_MAX_SIZE 4096
#define OC_MAX_BATCH 65535

// Grid (x, y, z), threads per block (x), dynamic shared memory in bytes.
struct OcLaunch {
  unsigned grid[3];
  unsigned block;
  size_t smem;
};

struct OcCropPlan {
  int n = 0;                          // samples
  int size = 0;                       // output side S
  int out_kind = OC_OUT_F32;
  float norm[6] = {0, 0, 0, 1, 1, 1};  // mean[3], 1/std[3] in pixel units
  std::vector<OcViewParams> params;   // 2 per sample: params[2 i + v]
  std::vector<float> taps;            // every blurred view's Gaussian taps (OcViewParams::blur_offset)
  std::vector<int> blurred;           // params index of each blurred view, in scratch-slot order
  OcLaunch rows{}, cols{};            // cols.grid[0] == 0: no blurred view, no second launch
  size_t scratch_floats = 0;          // the blur's intermediate buffer (S x S x 3 per blurred view)
  // The block copied to the device in one transfer: params | taps | blurred | norm, each at a 16-byte
  // aligned byte offset (unsigned long long elements, so any 8-byte aligned allocation holds it).
  std::vector<unsigned long long> packed;
  size_t off_params = 0, off_taps = 0, off_blurred = 0, off_norm = 0;
};

// "" when a batch of n samples at output side `size` can be launched, else why not (names the limit).
inline std::string oc_check_limits(long long n, long long size) {
  if (size < 1 || size > OC_MAX_SIZE)
    return "size must be in [1, " + std::to_string(OC_MAX_SIZE) + "] (the GPU kernel keeps a row of 3 x size floats " +
           "in 48 KiB of shared memory), got " + std::to_string(size);
  if (n > OC_MAX_BATCH)
    return "at most " + std::to_string(OC_MAX_BATCH) + " samples per batch (the GPU grid's z limit), got " +
           std::to_string(n);
  return "";
}

// Start a batch: n samples, side S, output kind, normalisation (the GPU limits are checked by
// oc_plan_finish: the CPU backend shares the per-view blocks and has none).
inline void oc_plan_begin(OcCropPlan &p, int n, int size, int out_kind, const float *norm) {
  p.n = n;
  p.size = size;
  p.out_kind = out_kind;
  for (int k = 0; k < 6; ++k) p.norm[k] = norm[k];
  p.params.assign(2 * static_cast<size_t>(n), OcViewParams{});
  p.taps.clear();
  p.blurred.clear();
}

// View v of sample i: window [x1, y1, x2, y2) inside an img_w x img_h image, flip, one row of `aug`
// (OC_AUG_K floats).  Returns "" or the fault, naming the sample, the view and the value.
inline std::string oc_plan_view(OcCropPlan &p, int i, int v, int img_w, int img_h, const int *win, int flip,
                                const float *aug, float contrast_center) {
  // the fault's prefix, built only on a fault (this runs for every view of every batch)
  auto where = [i, v] { return "sample " + std::to_string(i) + " view " + std::to_string(v) + ": "; };
  if (!(0 <= win[0] && win[0] < win[2] && win[2] <= img_w && 0 <= win[1] && win[1] < win[3] && win[3] <= img_h))
    return where() + "window [" + std::to_string(win[0]) + ", " + std::to_string(win[1]) + ", " +
           std::to_string(win[2]) + ", " + std::to_string(win[3]) + ") is not inside the " + std::to_string(img_w) +
           "x" + std::to_string(img_h) + " image (windows are [x1, y1, x2, y2) in the decoded image)";
  OcViewParams &q = p.params[2 * static_cast<size_t>(i) + v];
  for (int k = 0; k < 4; ++k) q.win[k] = win[k];
  q.img_w = img_w;
  q.img_h = img_h;
  q.flip = flip != 0;
  int bad = oc_view_from_aug(aug, contrast_center, &q);
  if (bad)
    return where() + "invalid aug column " + std::to_string(bad - 1) + " (blur needs sigma > 0 and an odd blur_window " +
           "in [1, " + std::to_string(OC_MAX_BLUR_WINDOW) + "], got sigma " + std::to_string(aug[OC_AUG_SIGMA]) +
           ", window " + std::to_string(aug[OC_AUG_BLUR_WINDOW]) + ")";
  q.blur_offset = static_cast<int>(p.taps.size());
  q.scratch = -1;
  if (q.blur_size) {
    p.taps.resize(p.taps.size() + q.blur_size);
    oc_gaussian_taps(aug[OC_AUG_SIGMA], q.blur_size, p.taps.data() + q.blur_offset);
  }
  return "";
}

// After every view and its image / output addresses are set: scratch slots, the blurred list, both launches'
// grids and shared memory, the scratch size, the packed block.  Returns "" or why the batch cannot launch.
inline std::string oc_plan_finish(OcCropPlan &p) {
  std::string err = oc_check_limits(p.n, p.size);
  if (!err.empty()) return err;
  const int S = p.size;
  p.blurred.clear();
  for (size_t k = 0; k < p.params.size(); ++k) {
    OcViewParams &q = p.params[k];
    q.scratch = -1;
    if (q.blur_size) {
      if (q.blur_size > OC_MAX_BLUR_WINDOW) return "blur window over the limit";
      q.scratch = static_cast<int>(p.blurred.size());
      p.blurred.push_back(static_cast<int>(k));
    }
  }
  p.rows = OcLaunch{{static_cast<unsigned>(S), 2u, static_cast<unsigned>(p.n)}, OC_ROW_THREADS,
                    sizeof(float) * 3 * static_cast<size_t>(S)};
  p.scratch_floats = p.blurred.size() * static_cast<size_t>(S) * S * 3;
  const long long chunks = (static_cast<long long>(S) * S + OC_COL_THREADS - 1) / OC_COL_THREADS;
  const long long blocks = static_cast<long long>(p.blurred.size()) * chunks;
  if (blocks >= (1LL << 31)) return "batch too large for one blur launch (" + std::to_string(blocks) + " blocks)";
  p.cols = OcLaunch{{static_cast<unsigned>(blocks), 1u, 1u}, OC_COL_THREADS, 0};
  // the packed block
  auto align16 = [](size_t b) { return (b + 15) & ~static_cast<size_t>(15); };
  p.off_params = 0;
  p.off_taps = align16(p.off_params + sizeof(OcViewParams) * p.params.size());
  p.off_blurred = align16(p.off_taps + sizeof(float) * p.taps.size());
  p.off_norm = align16(p.off_blurred + sizeof(int) * p.blurred.size());
  const size_t bytes = align16(p.off_norm + sizeof(float) * 6);
  p.packed.assign(bytes / sizeof(unsigned long long), 0ull);
  unsigned char *b = reinterpret_cast<unsigned char *>(p.packed.data());
  if (!p.params.empty()) memcpy(b + p.off_params, p.params.data(), sizeof(OcViewParams) * p.params.size());
  if (!p.taps.empty()) memcpy(b + p.off_taps, p.taps.data(), sizeof(float) * p.taps.size());
  if (!p.blurred.empty()) memcpy(b + p.off_blurred, p.blurred.data(), sizeof(int) * p.blurred.size());
  memcpy(b + p.off_norm, p.norm, sizeof(float) * 6);
  return "";
}

// The packed block's parts at base (a device or host copy of plan.packed).
struct OcPackedPtrs {
  const OcViewParams *params;
  const float *taps;
  const int *blurred;
  const float *norm;
};

inline OcPackedPtrs oc_packed_ptrs(const OcCropPlan &p, const void *base) {
  const unsigned char *b = static_cast<const unsigned char *>(base);
  return OcPackedPtrs{reinterpret_cast<const OcViewParams *>(b + p.off_params),
                      reinterpret_cast<const float *>(b + p.off_taps),
                      reinterpret_cast<const int *>(b + p.off_blurred), reinterpret_cast<const float *>(b + p.off_norm)};
}

#endif  // OBJCROP_CROP_PLAN_H
