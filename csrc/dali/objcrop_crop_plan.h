// objcrop_crop_plan.h -- the GPU backend's host-side launch plan of fn.objcrop.crop, free of DALI and CUDA.
//
// Everything the GPU RunImpl decides before it launches lives here, so that three callers share one text:
//   * the DALI operator (objcrop_crop.h SetupImpl: the per-view blocks; objcrop_crop_gpu.cc RunImpl: addresses,
//     scratch offsets, grids, shared memory, the packed block copied to the device, objcrop_crop_launch.h),
//   * the standalone kernel check (csrc/check/: the real kernels with this plan on a GPU, no DALI),
//   * the CPU emulator of the kernels (csrc/check/crop_emulate.cpp: walks the plan's grids serially).
//
// Limits (oc_check_limits: refused by name in the GPU operator's constructor, so when the pipeline is
// built, and again per batch by oc_plan_finish):
//   OC_MAX_SIZE         the row kernel keeps one output row of 3 x S floats in shared memory (S the batch's
//                       largest side, global or local): 4096 px is 48 KiB, the amount every GPU from sm_75 up
//                       gives a block without an opt-in
//   OC_MAX_BATCH        the row kernel's grid is (S, V, N): gridDim.z = N <= 65535
//   OC_MAX_VIEWS        ... and gridDim.y = V (2 global + M local views per sample) <= 65535
//   OC_MAX_BLUR_WINDOW  taps per blur pass (objcrop_augment.h)
//   the column-blur grid is flattened: fewer than 2^31 blocks (checked by oc_plan_finish)
//
// Views: V per sample, params[V i + v]; v = 0, 1 the global views (side `size`), v = 2 + j local view j (side
// `local_size`).  Every view carries its own side (OcViewParams::size), so views of different sizes share
// both launches: the row kernel's grid covers the largest side and a block past its view's own rows returns
// (uniformly, before the barrier); the blur scratch holds each blurred view's own size x size x 3 floats at
// a prefix-sum offset; the column-blur grid gives each blurred view ceil(size^2 / 256) blocks of its own.
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
#define OC_MAX_VIEWS 65535

// Grid (x, y, z), threads per block (x), dynamic shared memory in bytes.
struct OcLaunch {
  unsigned grid[3];
  unsigned block;
  size_t smem;
};

struct OcCropPlan {
  int n = 0;                          // samples
  int views = 2;                      // views per sample V: 2 global + (V - 2) local
  int size = 0;                       // the global views' output side
  int local_size = 0;                 // the local views' output side (0: no local views)
  int max_size = 0;                   // the largest side of any view (row grid, shared memory)
  int out_kind = OC_OUT_F32;
  float norm[6] = {0, 0, 0, 1, 1, 1};  // mean[3], 1/std[3] in pixel units
  std::vector<OcViewParams> params;   // V per sample: params[V i + v]
  std::vector<float> taps;            // every blurred view's Gaussian taps (OcViewParams::blur_offset)
  std::vector<int> blurred;           // params index of each blurred view, in scratch order
  std::vector<int> blur_first;        // first column-blur block of each blurred view, then the block count
  OcLaunch rows{}, cols{};            // cols.grid[0] == 0: no blurred view, no second launch
  size_t scratch_floats = 0;          // the blur's intermediate buffer (size x size x 3 per blurred view)
  // The block copied to the device in one transfer: params | taps | blurred | blur_first | norm, each at a
  // 16-byte aligned byte offset (unsigned long long elements, so any 8-byte aligned allocation holds it).
  std::vector<unsigned long long> packed;
  size_t off_params = 0, off_taps = 0, off_blurred = 0, off_first = 0, off_norm = 0;
};

// "" when a batch of n samples of `views` views each, the largest output side `size`, can be launched, else
// why not (names the limit; `what` names the side's argument).
inline std::string oc_check_limits(long long n, long long size, long long views = 2, const char *what = "size") {
  if (size < 1 || size > OC_MAX_SIZE)
    return std::string(what) + " must be in [1, " + std::to_string(OC_MAX_SIZE) + "] (the GPU kernel keeps a row of " +
           "3 x " + what + " floats in 48 KiB of shared memory), got " + std::to_string(size);
  if (n > OC_MAX_BATCH)
    return "at most " + std::to_string(OC_MAX_BATCH) + " samples per batch (the GPU grid's z limit), got " +
           std::to_string(n);
  if (views > OC_MAX_VIEWS)
    return "at most " + std::to_string(OC_MAX_VIEWS) + " views per sample (the GPU grid's y limit), got " +
           std::to_string(views);
  return "";
}

// The output side of view v (0, 1: global; 2 + j: local view j).
inline int oc_view_size(const OcCropPlan &p, int v) { return v < 2 ? p.size : p.local_size; }

// Start a batch: n samples, the global side, output kind, normalisation, and `local_views` local views of side
// `local_size` per sample (V = 2 + local_views).  The GPU limits are checked by oc_plan_finish: the CPU backend
// shares the per-view blocks and has none.
inline void oc_plan_begin(OcCropPlan &p, int n, int size, int out_kind, const float *norm, int local_views = 0,
                          int local_size = 0) {
  p.n = n;
  p.views = 2 + (local_views > 0 ? local_views : 0);
  p.size = size;
  p.local_size = p.views > 2 ? local_size : 0;
  p.max_size = p.local_size > size ? p.local_size : size;
  p.out_kind = out_kind;
  for (int k = 0; k < 6; ++k) p.norm[k] = norm[k];
  p.params.assign(static_cast<size_t>(p.views) * n, OcViewParams{});
  p.taps.clear();
  p.blurred.clear();
  p.blur_first.clear();
}

// View v of sample i: window [x1, y1, x2, y2) inside an img_w x img_h image, flip, one row of `aug`
// (OC_AUG_K floats).  Returns "" or the fault, naming the sample, the view and the value.
inline std::string oc_plan_view(OcCropPlan &p, int i, int v, int img_w, int img_h, const int *win, int flip,
                                const float *aug, float contrast_center) {
  // the fault's prefix, built only on a fault (this runs for every view of every batch)
  auto where = [i, v] {
    return "sample " + std::to_string(i) + " view " + std::to_string(v) +
           (v >= 2 ? " (local view " + std::to_string(v - 2) + ")" : std::string()) + ": ";
  };
  if (!(0 <= win[0] && win[0] < win[2] && win[2] <= img_w && 0 <= win[1] && win[1] < win[3] && win[3] <= img_h))
    return where() + "window [" + std::to_string(win[0]) + ", " + std::to_string(win[1]) + ", " +
           std::to_string(win[2]) + ", " + std::to_string(win[3]) + ") is not inside the " + std::to_string(img_w) +
           "x" + std::to_string(img_h) + " image (windows are [x1, y1, x2, y2) in the decoded image)";
  OcViewParams &q = p.params[static_cast<size_t>(p.views) * i + v];
  for (int k = 0; k < 4; ++k) q.win[k] = win[k];
  q.size = oc_view_size(p, v);
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

// Column-blur blocks of one blurred view of side S: ceil(S * S / OC_COL_THREADS).
inline long long oc_blur_chunks(long long S) { return (S * S + OC_COL_THREADS - 1) / OC_COL_THREADS; }

// After every view and its image / output addresses are set: scratch offsets, the blurred list and each blurred
// view's first column-blur block, both launches' grids and shared memory, the scratch size, the packed block.
// Returns "" or why the batch cannot launch.
inline std::string oc_plan_finish(OcCropPlan &p) {
  std::string err = oc_check_limits(p.n, p.size, p.views);
  if (err.empty() && p.views > 2) err = oc_check_limits(p.n, p.local_size, p.views, "local_size");
  if (!err.empty()) return err;
  p.blurred.clear();
  p.blur_first.clear();
  long long scratch = 0, blocks = 0;
  for (size_t k = 0; k < p.params.size(); ++k) {
    OcViewParams &q = p.params[k];
    q.scratch = -1;
    if (q.blur_size) {
      if (q.blur_size > OC_MAX_BLUR_WINDOW) return "blur window over the limit";
      q.scratch = scratch;
      scratch += static_cast<long long>(q.size) * q.size * 3;
      p.blurred.push_back(static_cast<int>(k));
      p.blur_first.push_back(static_cast<int>(blocks));
      blocks += oc_blur_chunks(q.size);
      if (blocks >= (1LL << 31)) return "batch too large for one blur launch (over 2^31 blocks)";
    }
  }
  p.blur_first.push_back(static_cast<int>(blocks));
  p.rows = OcLaunch{{static_cast<unsigned>(p.max_size), static_cast<unsigned>(p.views), static_cast<unsigned>(p.n)},
                    OC_ROW_THREADS, sizeof(float) * 3 * static_cast<size_t>(p.max_size)};
  p.scratch_floats = static_cast<size_t>(scratch);
  p.cols = OcLaunch{{static_cast<unsigned>(blocks), 1u, 1u}, OC_COL_THREADS, 0};
  // the packed block
  auto align16 = [](size_t b) { return (b + 15) & ~static_cast<size_t>(15); };
  p.off_params = 0;
  p.off_taps = align16(p.off_params + sizeof(OcViewParams) * p.params.size());
  p.off_blurred = align16(p.off_taps + sizeof(float) * p.taps.size());
  p.off_first = align16(p.off_blurred + sizeof(int) * p.blurred.size());
  p.off_norm = align16(p.off_first + sizeof(int) * p.blur_first.size());
  const size_t bytes = align16(p.off_norm + sizeof(float) * 6);
  p.packed.assign(bytes / sizeof(unsigned long long), 0ull);
  unsigned char *b = reinterpret_cast<unsigned char *>(p.packed.data());
  if (!p.params.empty()) memcpy(b + p.off_params, p.params.data(), sizeof(OcViewParams) * p.params.size());
  if (!p.taps.empty()) memcpy(b + p.off_taps, p.taps.data(), sizeof(float) * p.taps.size());
  if (!p.blurred.empty()) memcpy(b + p.off_blurred, p.blurred.data(), sizeof(int) * p.blurred.size());
  memcpy(b + p.off_first, p.blur_first.data(), sizeof(int) * p.blur_first.size());
  memcpy(b + p.off_norm, p.norm, sizeof(float) * 6);
  return "";
}

// The packed block's parts at base (a device or host copy of plan.packed).
struct OcPackedPtrs {
  const OcViewParams *params;
  const float *taps;
  const int *blurred;
  const int *blur_first;
  const float *norm;
};

inline OcPackedPtrs oc_packed_ptrs(const OcCropPlan &p, const void *base) {
  const unsigned char *b = static_cast<const unsigned char *>(base);
  return OcPackedPtrs{reinterpret_cast<const OcViewParams *>(b + p.off_params),
                      reinterpret_cast<const float *>(b + p.off_taps),
                      reinterpret_cast<const int *>(b + p.off_blurred),
                      reinterpret_cast<const int *>(b + p.off_first), reinterpret_cast<const float *>(b + p.off_norm)};
}

#endif  // OBJCROP_CROP_PLAN_H
