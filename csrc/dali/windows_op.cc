// windows_op.cc -- the objcrop__Windows DALI operator (fn.objcrop.windows), CPU backend.
//
// Per sample: the two global views' and the `local_crops` = M local views' crop windows, flips and
// augmentation draws of dali_objcrop.windows.sample_windows + augment.sample_aug_params, computed from
// the same counter-based key (seed, epoch, sample index), so a sample is still
// recomputable alone and the outputs equal the NumPy specification exactly
// (tests/operators/test_plugin_windows.py).  The window arithmetic is csrc/objcrop_core.h
// (oc_sample_windows, and oc_sample_local for the local views), the very text the CUDA kernels run.
//
// Inputs:  [boxes,] shape, index
//   boxes  (K, 4) float32 normalised [x1, y1, x2, y2], best-first (e.g. readers.coco(ltrb=True,
//          ratio=True)); omitted with `boxes_store` (looked up by row in a .boxes file) or for
//          scene crops only.
//   shape  image shape (H, W[, C]) of the ENCODED image, e.g. fn.peek_image_shape (any integer type).
//   index  the sample's key (its dataset position or any non-negative integer id), one integer.
// Outputs (CPU, per sample; V = 2 + M view rows, the global views first, then the local views in order;
//   M = 0 gives exactly the two-view outputs): roi (4,) int32 [x, y, w, h], the union of all V windows;
//   windows (V, 4) int32 [x1, y1, x2, y2) relative to the roi; flip (V,) uint8; aug (V, 9) float32; then,
//   in this order, where asked: details (12 + 5M,) int32 = regions (2x4, absolute), box_index, fallback,
//   shift dx, dy, then per local view [region x1, y1, x2, y2, box index]; resize_rois (V, 4) float32
//   (fn.resize's roi_start/roi_end); blur_kernels (V, W) float32; image_windows (V, 4) int32
//   [x1, y1, x2, y2) in the whole image's pixels (for a full decode).
// Traps refused (a user's own pipeline): boxes not finite, inverted or outside [0, 1] (pixel
//   boxes; `box_check="clip"` accepts boxes reaching outside the image), an object mode with
//   neither boxes nor boxes_store; box_scale left unset with a store is derived from it as the
//   loader does ((min(0.2 / mean top-k area, 1), 1)).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"

#include "../objcrop_core.h"
#include "objcrop_augment.h"  // oc_gaussian_taps: the blur kernels, as fn.objcrop.crop computes them

namespace objcrop {

using dali::CPUBackend;
using dali::OpSpec;
using dali::OutputDesc;
using dali::TensorList;
using dali::Workspace;

constexpr int kAugCols = 9;       // colour, brightness, contrast, saturation, hue, blur, sigma, window, solarize
constexpr int kViewAugParams = 10;  // jitter_p, b, c, s, hue, gray_p, blur_p, sigma_lo, sigma_hi, solarize_p
constexpr int kDetails = 12;
constexpr int kLocalDetails = 5;  // per local view: region x1, y1, x2, y2, box index

// augment.RECIPES, flattened per view in the kViewAugParams order: the two global views, then the
// local (multi-crop) views' augmentation (Recipe.local).
static const double kMocoV2[3 * kViewAugParams] = {0.8, 0.4, 0.4, 0.4, 0.1, 0.2, 0.5, 0.1, 2.0, 0.0,
                                                   0.8, 0.4, 0.4, 0.4, 0.1, 0.2, 0.5, 0.1, 2.0, 0.0,
                                                   0.8, 0.4, 0.4, 0.4, 0.1, 0.2, 0.5, 0.1, 2.0, 0.0};
static const double kByol[3 * kViewAugParams] = {0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 1.0, 0.1, 2.0, 0.0,
                                                 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.1, 0.1, 2.0, 0.2,
                                                 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.5, 0.1, 2.0, 0.0};

// augment._factor: uniform in [max(0, 1 - s), 1 + s], float64 as NumPy evaluates it.
static inline double Factor(double u, double s) {
  double lo = 1.0 - s > 0.0 ? 1.0 - s : 0.0;
  return lo + u * ((1.0 + s) - lo);
}

// augment.sample_aug_params for one sample and one view (0, 1 global; 2 + j local view j), in the
// contract's column order.
static void AugParams(oc_u64 key, int view, const double *a, float *out) {
  double u_jit, u_gray, u_b, u_c, u_s, u_h, u_blur, u_sigma, u_sol, unused;
  oc_uniforms(key, oc_aug_slot(view, 0), &u_jit, &u_gray);  // rng.aug_slot(view, k)
  oc_uniforms(key, oc_aug_slot(view, 1), &u_b, &u_c);
  oc_uniforms(key, oc_aug_slot(view, 2), &u_s, &u_h);
  oc_uniforms(key, oc_aug_slot(view, 3), &u_blur, &u_sigma);
  oc_uniforms(key, oc_aug_slot(view, 4), &u_sol, &unused);
  const bool jitter = u_jit < a[0], gray = u_gray < a[5];
  const double brightness = jitter ? Factor(u_b, a[1]) : 1.0;
  const double contrast = jitter ? Factor(u_c, a[2]) : 1.0;
  const double saturation = (jitter ? Factor(u_s, a[3]) : 1.0) * (gray ? 0.0 : 1.0);
  const double hue = jitter ? ((2.0 * u_h - 1.0) * a[4]) * 360.0 : 0.0;
  const double sigma = a[7] + u_sigma * (a[8] - a[7]);
  out[0] = (jitter || gray) ? 1.0f : 0.0f;
  out[1] = static_cast<float>(brightness);
  out[2] = static_cast<float>(contrast);
  out[3] = static_cast<float>(saturation);
  out[4] = static_cast<float>(hue);
  out[5] = u_blur < a[6] ? 1.0f : 0.0f;
  out[6] = static_cast<float>(sigma);
  out[7] = static_cast<float>(2.0 * std::ceil(3.0 * sigma) + 1.0);  // augment.blur_window (from float64)
  out[8] = u_sol < a[9] ? 1.0f : 0.0f;
}

// numpy's pairwise summation of float64 (umath loops_utils: 8 accumulators, blocks of 128).
static double PairwiseSum(const double *a, int64_t n) {
  if (n < 8) {
    double res = 0.;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i;
    for (i = 8; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return PairwiseSum(a, n2) + PairwiseSum(a + n2, n - n2);
}

// A read-only memory map of a .boxes store (format: dali_objcrop/boxstore.py).
class BoxStoreMap {
 public:
  explicit BoxStoreMap(const std::string &path) : path_(path) {
    int fd = open(path.c_str(), O_RDONLY);
    DALI_ENFORCE(fd >= 0, dali::make_string("objcrop: cannot open box store ", path));
    struct stat st;
    fstat(fd, &st);
    size_ = static_cast<size_t>(st.st_size);
    // format 2 (checksummed: a sha256 of magic + length + header follows the header) and format 1;
    // the checksums are verified by BoxStore.load, which the loader calls before handing the path over
    static const char kMagic[11] = {'O', 'B', 'J', 'C', 'R', 'O', 'P', 'B', 'O', 'X', 0};
    if (size_ < 20) {
      close(fd);
      DALI_FAIL(dali::make_string("objcrop: ", path, " is not a dali_objcrop box store (too short)"));
    }
    base_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    DALI_ENFORCE(base_ != MAP_FAILED, dali::make_string("objcrop: cannot map box store ", path));
    const char *p = static_cast<const char *>(base_);
    DALI_ENFORCE(std::memcmp(p, kMagic, 11) == 0 && (p[11] == 1 || p[11] == 2),
                 dali::make_string("objcrop: ", path, " is not a dali_objcrop box store (bad magic)"));
    const size_t digest = p[11] == 2 ? 32 : 0;
    uint64_t hlen;
    std::memcpy(&hlen, p + 12, 8);
    DALI_ENFORCE(hlen < size_ - 20, dali::make_string("objcrop: box store ", path, ": bad header length"));
    std::string header(p + 20, hlen);
    size_t data_start = ((20 + hlen + digest + 63) / 64) * 64;
    // The arrays table is the header's last top-level key ({"meta": ..., "arrays": ...}).
    size_t arrays = header.rfind("\"arrays\"");
    DALI_ENFORCE(arrays != std::string::npos, dali::make_string("objcrop: box store ", path, ": no arrays table"));
    int64_t n_off, n_box;
    size_t off_off = Array(header, arrays, "offsets", "<i8", &n_off, nullptr);
    int64_t cols = 0;
    size_t box_off = Array(header, arrays, "boxes", "<f4", &n_box, &cols);
    DALI_ENFORCE(n_off >= 1 && (n_box == 0 || cols == 4),
                 dali::make_string("objcrop: box store ", path, ": bad offsets/boxes shapes"));
    num_images_ = n_off - 1;
    num_boxes_ = n_box;
    DALI_ENFORCE(data_start + off_off + 8 * n_off <= size_ &&
                 (n_box == 0 || data_start + box_off + 16 * n_box <= size_),
                 dali::make_string("objcrop: box store ", path, " is truncated"));
    offsets_ = reinterpret_cast<const int64_t *>(p + data_start + off_off);
    boxes_ = n_box ? reinterpret_cast<const float *>(p + data_start + box_off) : nullptr;
  }
  ~BoxStoreMap() {
    if (base_ && base_ != MAP_FAILED) munmap(base_, size_);
  }
  int64_t num_images() const { return num_images_; }
  // BoxStore.mean_area_fraction(top_k): the mean of (x2 - x1) * (y2 - y1) in float64 over each
  // image's first top_k boxes, summed as NumPy sums (pairwise), so the value is the loader's double.
  // Returns false when the store holds no box.
  bool MeanArea(int64_t top_k, double *mean) const {
    std::vector<double> area;
    for (int64_t r = 0; r < num_images_; ++r) {
      int64_t count;
      const float *b = Row(r, &count);
      for (int64_t j = 0; j < std::min(count, top_k); ++j) {
        const float *q = b + 4 * j;
        area.push_back((static_cast<double>(q[2]) - static_cast<double>(q[0])) *
                       (static_cast<double>(q[3]) - static_cast<double>(q[1])));
      }
    }
    if (area.empty()) return false;
    *mean = PairwiseSum(area.data(), static_cast<int64_t>(area.size())) / static_cast<double>(area.size());
    return true;
  }
  // Boxes of row r: pointer and count, checked against the store.
  const float *Row(int64_t r, int64_t *count) const {
    DALI_ENFORCE(r >= 0 && r < num_images_, dali::make_string("objcrop: box store ", path_, " has ", num_images_,
                                                                " images, asked for row ", r));
    int64_t a = offsets_[r], b = offsets_[r + 1];
    DALI_ENFORCE(0 <= a && a <= b && b <= num_boxes_,
                 dali::make_string("objcrop: box store ", path_, ": corrupt offsets at row ", r));
    *count = b - a;
    return boxes_ ? boxes_ + 4 * a : nullptr;
  }

 private:
  // Finds "name": {"dtype": ..., "shape": [...], "offset": ...} after position `from`.
  size_t Array(const std::string &h, size_t from, const char *name, const char *dtype, int64_t *rows,
               int64_t *cols) {
    std::string key = std::string("\"") + name + "\"";
    size_t k = h.find(key, from);
    DALI_ENFORCE(k != std::string::npos, dali::make_string("objcrop: box store ", path_, ": no array ", name));
    size_t end = h.find('}', k);
    std::string spec = h.substr(k, end - k);
    DALI_ENFORCE(spec.find(std::string("\"") + dtype + "\"") != std::string::npos,
                 dali::make_string("objcrop: box store ", path_, ": array ", name, " is not ", dtype));
    size_t s = spec.find("\"shape\"");
    size_t lb = spec.find('[', s), rb = spec.find(']', s);
    DALI_ENFORCE(s != std::string::npos && lb != std::string::npos && rb != std::string::npos,
                 dali::make_string("objcrop: box store ", path_, ": array ", name, " has no shape"));
    std::string dims = spec.substr(lb + 1, rb - lb - 1);
    *rows = std::strtoll(dims.c_str(), nullptr, 10);
    if (cols) {
      size_t comma = dims.find(',');
      *cols = comma == std::string::npos ? 0 : std::strtoll(dims.c_str() + comma + 1, nullptr, 10);
    }
    size_t o = spec.find("\"offset\"");
    DALI_ENFORCE(o != std::string::npos, dali::make_string("objcrop: box store ", path_, ": array ", name,
                                                           " has no offset"));
    size_t colon = spec.find(':', o);
    return static_cast<size_t>(std::strtoull(spec.c_str() + colon + 1, nullptr, 10));
  }

  std::string path_;
  void *base_ = nullptr;
  size_t size_ = 0;
  int64_t num_images_ = 0, num_boxes_ = 0;
  const int64_t *offsets_ = nullptr;
  const float *boxes_ = nullptr;
};

// One integer of sample i of an integer tensor list (int32/int64/uint32/uint64), element k.
static int64_t IntAt(const TensorList<CPUBackend> &in, int i, int k, const char *what) {
  const void *p = in.raw_tensor(i);
  switch (in.type()) {
    case DALI_INT32: return static_cast<const int32_t *>(p)[k];
    case DALI_INT64: return static_cast<const int64_t *>(p)[k];
    case DALI_UINT32: return static_cast<const uint32_t *>(p)[k];
    case DALI_UINT64: return static_cast<int64_t>(static_cast<const uint64_t *>(p)[k]);
    case DALI_INT16: return static_cast<const int16_t *>(p)[k];
    case DALI_UINT16: return static_cast<const uint16_t *>(p)[k];
    default: DALI_FAIL(dali::make_string("objcrop.windows: ", what, " must be an integer tensor, got type ",
                                         in.type()));
  }
}

// Real-valued arguments are text ("0.2, 1.0"): DALI's Python API has no float64 arguments and
// float32 would change the windows (0.1 as float32 is not 0.1); strtod of Python's repr(float)
// gives back the very double the NumPy specification uses.
static std::vector<double> Numbers(const OpSpec &spec, const char *name, size_t count) {
  const std::string text = spec.GetArgument<std::string>(name);
  std::vector<double> out;
  for (const char *c = text.c_str(); *c;) {
    while (*c == ',' || *c == ' ' || *c == '(' || *c == ')' || *c == '[' || *c == ']') ++c;
    if (!*c) break;
    char *end;
    double x = std::strtod(c, &end);
    DALI_ENFORCE(end != c && std::isfinite(x),
                 dali::make_string("objcrop.windows: argument ", name, ": not a number at '", c, "'"));
    out.push_back(x);
    c = end;
  }
  DALI_ENFORCE(count == 0 || out.size() == count, dali::make_string("objcrop.windows: argument ", name, " needs ",
                                                                     count, " numbers, got '", text, "'"));
  return out;
}

class Windows : public dali::StatelessOperator<CPUBackend> {
 public:
  explicit Windows(const OpSpec &spec) : dali::StatelessOperator<CPUBackend>(spec) {
    const std::string mode = spec.GetArgument<std::string>("mode");
    int k0, k1;
    if (mode == "scene-scene") { k0 = OC_KIND_SCENE; k1 = OC_KIND_SCENE; }
    else if (mode == "obj-scene") { k0 = OC_KIND_BOX; k1 = OC_KIND_SCENE; }
    else if (mode == "obj-obj") { k0 = OC_KIND_BOX; k1 = OC_KIND_BOX; }
    else if (mode == "obj-obj-dilate") { k0 = OC_KIND_BOX; k1 = OC_KIND_DILATED; }
    else if (mode == "obj-obj-shift") { k0 = OC_KIND_BOX; k1 = OC_KIND_SHIFTED; }
    else DALI_FAIL(dali::make_string("objcrop.windows: unknown mode '", mode, "' (scene-scene, obj-scene, obj-obj, "
                                     "obj-obj-dilate, obj-obj-shift)"));
    auto pair = [&](const char *name, bool unit) {
      auto v = Numbers(spec, name, 2);
      DALI_ENFORCE(v[0] >= 0 && (!unit || v[0] > 0) && v[0] <= v[1] && (!unit || v[1] <= 1.0),
                   dali::make_string("objcrop.windows: ", name, " must satisfy ", unit ? "0 < " : "0 <= ",
                                     "lo <= hi", unit ? " <= 1" : ""));
      return v;
    };
    auto scale = pair("scale", true), shift = pair("shift_range", false);
    // box_scale: given, or (unset) derived from the store as the loader derives it, else (1, 1)
    const bool box_scale_given = !Numbers(spec, "box_scale", 0).empty();
    std::vector<double> box_scale = box_scale_given ? pair("box_scale", true) : std::vector<double>{1.0, 1.0};
    auto ratio = Numbers(spec, "ratio", 2);
    DALI_ENFORCE(ratio[0] > 0 && ratio[0] <= ratio[1], "objcrop.windows: ratio must satisfy 0 < lo <= hi");
    const double dilate = Numbers(spec, "dilate", 1)[0];
    DALI_ENFORCE(dilate >= 0 && dilate <= 1, "objcrop.windows: dilate must be in [0, 1]");
    const int64_t top_k = spec.GetArgument<int>("top_k"), min_box = spec.GetArgument<int>("min_box_size");
    const int num_tries = spec.GetArgument<int>("num_tries");
    DALI_ENFORCE(top_k >= 1 && min_box >= 1 && num_tries >= 1 && num_tries <= OC_MAX_TRIES,
                 "objcrop.windows: need top_k >= 1, min_box_size >= 1, 1 <= num_tries <= 10");
    const double flip_p = Numbers(spec, "flip_p", 1)[0];
    DALI_ENFORCE(flip_p >= 0 && flip_p <= 1, "objcrop.windows: flip_p must be in [0, 1]");
    const int64_t seed = spec.GetArgument<int64_t>("seed");
    DALI_ENFORCE(seed >= 0, "objcrop.windows: seed must be >= 0");
    seed_ = static_cast<oc_u64>(seed);
    double *p = params_;
    p[OC_P_KIND0] = k0;
    p[OC_P_KIND1] = k1;
    p[OC_P_USES_BOXES] = mode != "scene-scene";
    p[OC_P_SCALE_LO] = scale[0];
    p[OC_P_SCALE_HI] = scale[1];
    p[OC_P_BOX_LO] = box_scale[0];
    p[OC_P_BOX_HI] = box_scale[1];
    p[OC_P_LOG_R0] = std::log(ratio[0]);  // as math.log in windows.py
    p[OC_P_LOG_R1] = std::log(ratio[1]);
    p[OC_P_RATIO0] = ratio[0];
    p[OC_P_RATIO1] = ratio[1];
    p[OC_P_DILATE] = mode == "obj-obj" ? 0.0 : dilate;
    p[OC_P_SHIFT_R0] = shift[0];
    p[OC_P_SHIFT_R1] = shift[1];
    p[OC_P_MIN_BOX] = static_cast<double>(min_box);
    p[OC_P_TOP_K] = static_cast<double>(top_k);
    p[OC_P_NUM_TRIES] = num_tries;
    p[OC_P_FLIP_P] = flip_p;

    // local (multi-crop) views: windows._sample_local, M = local_crops of them after the two global views
    const int local_crops = spec.GetArgument<int>("local_crops");
    DALI_ENFORCE(local_crops >= 0 && local_crops <= OC_MAX_LOCAL_VIEWS,
                 dali::make_string("objcrop.windows: local_crops must be in [0, ", OC_MAX_LOCAL_VIEWS, "], got ",
                                   local_crops));
    num_local_ = local_crops;
    auto local_scale = pair("local_scale", true);
    local_lo_ = local_scale[0];
    local_hi_ = local_scale[1];
    const std::string local_from = spec.GetArgument<std::string>("local_from");
    if (local_from == "box") local_from_ = OC_LOCAL_FROM_BOX;
    else if (local_from == "boxes") local_from_ = OC_LOCAL_FROM_BOXES;
    else if (local_from == "scene") local_from_ = OC_LOCAL_FROM_SCENE;
    else DALI_FAIL(dali::make_string("objcrop.windows: local_from must be one of box, boxes, scene, got '",
                                     local_from, "'"));
    DALI_ENFORCE(!(num_local_ > 0 && local_from_ != OC_LOCAL_FROM_SCENE && mode == "scene-scene"),
                 dali::make_string("objcrop.windows: local_from='", local_from, "' draws local views inside "
                                   "proposals, and mode 'scene-scene' uses none: use local_from='scene' (or an "
                                   "object mode)"));

    // aug: 20 numbers (the global views; the local views take the recipe's local augmentation) or 30
    std::vector<double> aug = Numbers(spec, "aug", 0);
    const std::string recipe = spec.GetArgument<std::string>("recipe");
    const double *r = recipe == "mocov2" ? kMocoV2 : recipe == "byol" ? kByol : nullptr;
    if (aug.empty()) {
      DALI_ENFORCE(r != nullptr, dali::make_string("objcrop.windows: unknown recipe '", recipe,
                                                   "' (mocov2, byol; or give `aug`)"));
      aug.assign(r, r + 3 * kViewAugParams);
    }
    DALI_ENFORCE(aug.size() == 2 * kViewAugParams || aug.size() == 3 * kViewAugParams,
                 "objcrop.windows: aug must hold 20 values (per global view: jitter_p, brightness, contrast, "
                 "saturation, hue, gray_p, blur_p, sigma_lo, sigma_hi, solarize_p) or 30 (then the local views' "
                 "10 in the same order)");
    if (aug.size() == 2 * kViewAugParams) {
      if (r != nullptr) {
        aug.insert(aug.end(), r + 2 * kViewAugParams, r + 3 * kViewAugParams);
      } else {
        DALI_ENFORCE(num_local_ == 0, dali::make_string("objcrop.windows: local_crops > 0 with a 20-number aug "
                                                        "takes the local views' augmentation from recipe, and "
                                                        "recipe '", recipe, "' is unknown (mocov2, byol; or give "
                                                        "30 numbers in aug)"));
        aug.insert(aug.end(), aug.begin(), aug.begin() + kViewAugParams);  // unused: no local view
      }
    }
    std::copy(aug.begin(), aug.end(), aug_);
    details_ = spec.GetArgument<bool>("details");
    resize_rois_ = spec.GetArgument<bool>("resize_rois");
    blur_kernels_ = spec.GetArgument<bool>("blur_kernels");
    for (int v = 0; v < 3; ++v) {
      const double *a = aug_ + v * kViewAugParams;
      DALI_ENFORCE(a[7] > 0 && a[7] <= a[8] && a[8] <= 10.0,
                   "objcrop.windows: blur sigma ranges (aug) must satisfy 0 < lo <= hi <= 10");
    }
    const std::string store = spec.GetArgument<std::string>("boxes_store");
    if (!store.empty()) store_ = std::make_unique<BoxStoreMap>(store);
    image_windows_ = spec.GetArgument<bool>("image_windows");
    const std::string check = spec.GetArgument<std::string>("box_check");
    DALI_ENFORCE(check == "error" || check == "clip",
                 dali::make_string("objcrop.windows: box_check must be 'error' or 'clip', got '", check, "'"));
    clip_boxes_ = check == "clip";
    const bool has_boxes_input = spec.NumRegularInput() == 3;
    DALI_ENFORCE(!(store_ && has_boxes_input), "objcrop.windows: give either a boxes input or boxes_store, not both");
    if (mode != "scene-scene") {
      // without boxes every sample would silently get scene crops
      DALI_ENFORCE(store_ || has_boxes_input,
                   dali::make_string("objcrop.windows: mode '", mode, "' needs boxes: give a boxes input "
                                     "([boxes,] shape, index) or boxes_store (without them every image gets scene "
                                     "crops; mode='scene-scene' says so)"));
      if (!box_scale_given && store_) {
        double mean;
        if (store_->MeanArea(top_k, &mean)) {
          DALI_ENFORCE(mean > 0 && std::isfinite(mean),
                       dali::make_string("objcrop.windows: box store ", store, ": mean box area ", mean));
          p[OC_P_BOX_LO] = std::min(0.2 / mean, 1.0);  // windows.box_scale_from_mean_area(mean)
          p[OC_P_BOX_HI] = 1.0;
        }
      } else if (!box_scale_given) {
        DALI_WARN(dali::make_string("objcrop.windows: box_scale is not set with a boxes input: crops inside a box "
                                    "use scale (1, 1); the loader derives (min(0.2 / mean box area, 1), 1) from its "
                                    "store (dali_objcrop.box_scale_from_mean_area)"));
      }
    }
  }

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const int n = ws.GetInputBatchSize(0);
    const int nin = ws.NumInput();
    (void)nin;
    const int64_t nv = 2 + num_local_;  // view rows: the global views, then the local views
    out.resize(4 + details_ + resize_rois_ + blur_kernels_ + image_windows_);
    out[0] = {dali::uniform_list_shape(n, {4}), DALI_INT32};
    out[1] = {dali::uniform_list_shape(n, {nv, int64_t{4}}), DALI_INT32};
    out[2] = {dali::uniform_list_shape(n, {nv}), DALI_UINT8};
    out[3] = {dali::uniform_list_shape(n, {nv, int64_t{kAugCols}}), DALI_FLOAT};
    int o = 4;
    if (details_) out[o++] = {dali::uniform_list_shape(n, {kDetails + kLocalDetails * num_local_}), DALI_INT32};
    if (resize_rois_) out[o++] = {dali::uniform_list_shape(n, {nv, int64_t{4}}), DALI_FLOAT};
    if (blur_kernels_) {  // (V, W): W = the largest of the views' odd kernel sizes (per sample)
      dali::TensorListShape<2> sh(n);
      const auto &index_in = ws.Input<CPUBackend>(ws.NumInput() - 1);
      for (int i = 0; i < n; ++i) {
        const oc_u64 key = oc_sample_key(seed_, static_cast<oc_u64>(spec_.GetArgument<int64_t>("epoch", &ws, i)),
                                         static_cast<oc_u64>(IntAt(index_in, i, 0, "index")));
        float width = 0.0f;
        for (int v = 0; v < nv; ++v) {
          float a[kAugCols];
          AugParams(key, v, ViewAug(v), a);
          width = std::max(width, a[7]);
        }
        sh.set_tensor_shape(i, {nv, static_cast<int64_t>(width)});
      }
      out[o++] = {sh, DALI_FLOAT};
    }
    if (image_windows_) out[o++] = {dali::uniform_list_shape(n, {nv, int64_t{4}}), DALI_INT32};
    return true;
  }

  void RunImpl(Workspace &ws) override {
    const int nin = ws.NumInput();
    const bool has_boxes = nin == 3;
    const auto &shape_in = ws.Input<CPUBackend>(nin - 2);
    const auto &index_in = ws.Input<CPUBackend>(nin - 1);
    const int n = shape_in.num_samples();
    const bool has_row = spec_.HasTensorArgument("store_row") || spec_.HasArgument("store_row");
    auto &roi_out = ws.Output<CPUBackend>(0);
    auto &win_out = ws.Output<CPUBackend>(1);
    auto &flip_out = ws.Output<CPUBackend>(2);
    auto &aug_out = ws.Output<CPUBackend>(3);
    for (int i = 0; i < n; ++i) {
      const auto &ts = shape_in.tensor_shape(i);
      DALI_ENFORCE(ts.num_elements() >= 2, dali::make_string("objcrop.windows: sample ", i,
                                                             ": shape must be (H, W[, C]), got ", ts));
      const int64_t h = IntAt(shape_in, i, 0, "shape"), w = IntAt(shape_in, i, 1, "shape");
      DALI_ENFORCE(h >= 1 && w >= 1 && h < (1 << 30) && w < (1 << 30),
                   dali::make_string("objcrop.windows: sample ", i, ": bad image shape ", h, "x", w));
      DALI_ENFORCE(index_in.tensor_shape(i).num_elements() == 1,
                   dali::make_string("objcrop.windows: sample ", i, ": index must hold one integer"));
      const int64_t index = IntAt(index_in, i, 0, "index");
      DALI_ENFORCE(index >= 0, dali::make_string("objcrop.windows: sample ", i, ": index must be >= 0, got ", index));
      const int64_t epoch = spec_.GetArgument<int64_t>("epoch", &ws, i);
      DALI_ENFORCE(epoch >= 0, "objcrop.windows: epoch must be >= 0");
      const float *boxes = nullptr;
      int64_t count = 0;
      if (has_boxes) {
        const auto &bin = ws.Input<CPUBackend>(0);
        DALI_ENFORCE(bin.type() == DALI_FLOAT, "objcrop.windows: boxes must be float32");
        const auto &bs = bin.tensor_shape(i);
        const int64_t ne = bs.num_elements();
        DALI_ENFORCE(ne % 4 == 0 && (ne == 0 || bs[bs.sample_dim() - 1] == 4),
                     dali::make_string("objcrop.windows: sample ", i, ": boxes must be (K, 4), got ", bs));
        boxes = static_cast<const float *>(bin.raw_tensor(i));
        count = ne / 4;
      } else if (store_) {
        const int64_t row = has_row ? spec_.GetArgument<int64_t>("store_row", &ws, i) : index;
        boxes = store_->Row(row, &count);
      }
      CheckBoxes(boxes, count, i, index);
      int sizes[2] = {static_cast<int>(w), static_cast<int>(h)};
      const oc_i64 offsets[2] = {0, count};
      const oc_i64 idx[1] = {index};
      const float zero_box[4] = {0, 0, 1, 1};
      const float *sample_boxes = count ? boxes : zero_box;
      OcSample s = oc_sample_windows(0, sizes, sample_boxes, offsets, idx, seed_, static_cast<oc_u64>(epoch),
                                     params_);
      const oc_u64 key = oc_sample_key(seed_, static_cast<oc_u64>(epoch), static_cast<oc_u64>(index));
      // every view's absolute window, flip and region: the global views, then the local views
      int views[2 + OC_MAX_LOCAL_VIEWS][4], flips[2 + OC_MAX_LOCAL_VIEWS];
      OcLocal local[OC_MAX_LOCAL_VIEWS];
      for (int v = 0; v < 2; ++v) {
        std::copy(s.win[v], s.win[v] + 4, views[v]);
        flips[v] = s.flip[v];
      }
      for (int j = 0; j < num_local_; ++j) {
        local[j] = oc_sample_local(0, j, s, local_from_, local_lo_, local_hi_, sizes, sample_boxes, offsets, key,
                                   params_);
        std::copy(local[j].win, local[j].win + 4, views[2 + j]);
        flips[2 + j] = local[j].flip;
      }
      const int nv = 2 + num_local_;
      // the union of all windows: what the decoder decodes
      int x0 = views[0][0], y0 = views[0][1], x1 = views[0][2], y1 = views[0][3];
      for (int v = 1; v < nv; ++v) {
        x0 = std::min(x0, views[v][0]);
        y0 = std::min(y0, views[v][1]);
        x1 = std::max(x1, views[v][2]);
        y1 = std::max(y1, views[v][3]);
      }
      int32_t *roi = roi_out.mutable_tensor<int32_t>(i);
      roi[0] = x0; roi[1] = y0; roi[2] = x1 - x0; roi[3] = y1 - y0;
      int32_t *win = win_out.mutable_tensor<int32_t>(i);
      uint8_t *flip = flip_out.mutable_tensor<uint8_t>(i);
      float *aug = aug_out.mutable_tensor<float>(i);
      for (int v = 0; v < nv; ++v) {
        win[4 * v + 0] = views[v][0] - x0;
        win[4 * v + 1] = views[v][1] - y0;
        win[4 * v + 2] = views[v][2] - x0;
        win[4 * v + 3] = views[v][3] - y0;
        flip[v] = static_cast<uint8_t>(flips[v]);
        AugParams(key, v, ViewAug(v), aug + v * kAugCols);
      }
      int o = 4;
      int32_t *absolute = nullptr;
      if (image_windows_) absolute = ws.Output<CPUBackend>(4 + details_ + resize_rois_ + blur_kernels_)
                                         .mutable_tensor<int32_t>(i);
      for (int v = 0; v < nv && absolute; ++v)
        for (int k = 0; k < 4; ++k) absolute[4 * v + k] = views[v][k];
      if (details_) {
        int32_t *d = ws.Output<CPUBackend>(o++).mutable_tensor<int32_t>(i);
        for (int v = 0; v < 2; ++v)
          for (int k = 0; k < 4; ++k) d[4 * v + k] = s.region[v][k];
        d[8] = s.box_index;
        d[9] = s.fallback;
        d[10] = s.shift[0];
        d[11] = s.shift[1];
        for (int j = 0; j < num_local_; ++j) {
          int32_t *dl = d + kDetails + kLocalDetails * j;
          for (int k = 0; k < 4; ++k) dl[k] = local[j].region[k];
          dl[4] = local[j].box_index;
        }
      }
      if (resize_rois_) {  // fn.resize's roi_start / roi_end, (y, x); a flipped view swaps x (DALI mirrors)
        float *r = ws.Output<CPUBackend>(o++).mutable_tensor<float>(i);
        for (int v = 0; v < nv; ++v) {
          const int32_t *wv = win + 4 * v;
          r[4 * v + 0] = static_cast<float>(wv[1]);
          r[4 * v + 1] = static_cast<float>(flip[v] ? wv[2] : wv[0]);
          r[4 * v + 2] = static_cast<float>(wv[3]);
          r[4 * v + 3] = static_cast<float>(flip[v] ? wv[0] : wv[2]);
        }
      }
      if (blur_kernels_) {  // augment.gaussian_kernels per view, centred in W taps (zeros outside)
        auto &kout = ws.Output<CPUBackend>(o++);
        const int64_t width = kout.tensor_shape(i)[1];
        float *k = kout.mutable_tensor<float>(i);
        for (int v = 0; v < nv; ++v) {
          const double *a = ViewAug(v);
          double u_blur, u_sigma;
          oc_uniforms(key, oc_aug_slot(v, 3), &u_blur, &u_sigma);
          const double sigma = a[7] + u_sigma * (a[8] - a[7]);
          const int64_t size = static_cast<int64_t>(2.0 * std::ceil(3.0 * sigma) + 1.0);
          const int64_t pad = (width - size) / 2;
          float taps[64];  // the crop operator's taps; size <= 61: sigma <= 10 (checked in the constructor)
          oc_gaussian_taps(sigma, static_cast<int>(size), taps);
          for (int64_t j = 0; j < width; ++j) {
            const int64_t t = j - pad;
            k[v * width + j] = (t >= 0 && t < size) ? taps[t] : 0.0f;
          }
        }
      }
    }
  }

 private:
  // Boxes must be normalised ltrb: finite, and (box_check="error") inside [0, 1] up to 1e-3 with
  // x1 <= x2, y1 <= y2 -- pixel boxes or xywh otherwise give crops from the wrong place silently.
  void CheckBoxes(const float *b, int64_t count, int i, int64_t index) const {
    for (int64_t j = 0; j < count; ++j) {
      const float *q = b + 4 * j;
      const bool finite = std::isfinite(q[0]) && std::isfinite(q[1]) && std::isfinite(q[2]) && std::isfinite(q[3]);
      const double tol = 1e-3;
      bool inside = true;
      for (int k = 0; k < 4; ++k) inside = inside && q[k] >= -tol && q[k] <= 1.0 + tol;
      const bool ordered = q[0] <= q[2] && q[1] <= q[3];
      if (finite && (clip_boxes_ || (inside && ordered))) continue;
      DALI_FAIL(dali::make_string(
          "objcrop.windows: sample ", i, " (index ", index, "), box ", j, " = [", q[0], ", ", q[1], ", ", q[2], ", ",
          q[3], "]: ", !finite ? "not finite" : !inside ? "outside [0, 1]" : "inverted (x2 < x1 or y2 < y1)",
          ". Boxes must be normalised [x1, y1, x2, y2] (readers.coco: ltrb=True, ratio=True)",
          !finite ? "" : "; box_check='clip' accepts boxes reaching outside the image (they are clipped)"));
    }
  }

  // the kViewAugParams numbers of view v's augmentation: 0, 1 global, 2 + j (every local view) the third block
  const double *ViewAug(int v) const { return aug_ + (v < 2 ? v : 2) * kViewAugParams; }

  double params_[OC_NUM_PARAMS];
  double aug_[3 * kViewAugParams];  // global view 0, global view 1, the local views
  oc_u64 seed_ = 0;
  int num_local_ = 0, local_from_ = OC_LOCAL_FROM_BOX;
  double local_lo_ = 0.05, local_hi_ = 0.4;
  bool details_ = false, resize_rois_ = false, blur_kernels_ = false, image_windows_ = false, clip_boxes_ = false;
  std::unique_ptr<BoxStoreMap> store_;
};

}  // namespace objcrop

namespace dali {

DALI_REGISTER_OPERATOR(objcrop__Windows, ::objcrop::Windows, CPU);

DALI_SCHEMA(objcrop__Windows)
    .DocStr(R"(Object-aware crop windows, flips and augmentation draws of every view, per sample.

Equal to ``dali_objcrop.windows.sample_windows`` and ``augment.sample_aug_params`` for the same
key (seed, epoch, index). Inputs: ``[boxes,] shape, index`` -- boxes (K, 4) float32 normalised
ltrb, best-first (omit them with ``boxes_store`` or for scene crops); the encoded image's shape
(H, W[, C]) as ``fn.peek_image_shape`` gives it; the sample's key (one non-negative integer).
V = 2 + local_crops view rows: the two global views, then the local (multi-crop) views in order
(local_crops = 0: the two global views only). Outputs: roi (4,) int32 [x, y, w, h] (the union of all
V windows: what to decode), windows (V, 4) int32 [x1, y1, x2, y2) relative to the roi, flip (V,) uint8,
aug (V, 9) float32 [colour_applied, brightness, contrast, saturation, hue_degrees, blur_applied, sigma,
blur_window, solarize_applied]; then, where asked for, in this order: ``details`` (12 + 5 local_crops,)
int32 [regions (2x4), box_index, fallback, shift dx, dy, then per local view its region x1, y1, x2, y2
and box index], ``resize_rois`` (V, 4) float32, ``blur_kernels`` (V, W) float32, ``image_windows``
(V, 4) int32 (the windows in the whole image's pixels). Boxes that are not finite, inverted or outside
[0, 1] are refused naming the sample (``box_check``); object modes need boxes or ``boxes_store``.)")
    .NumInput(2, 3)
    .OutputFn([](const OpSpec &spec) {
      return 4 + spec.GetArgument<bool>("details") + spec.GetArgument<bool>("resize_rois") +
             spec.GetArgument<bool>("blur_kernels") + spec.GetArgument<bool>("image_windows");
    })
    .AddOptionalArg("mode", "Crop mode: scene-scene, obj-scene, obj-obj, obj-obj-dilate, obj-obj-shift.",
                    std::string("obj-obj-dilate"))
    .AddOptionalArg("scale", "Scene-crop area range 'lo, hi' (fraction of the image; text, read as float64).",
                    std::string("0.2, 1.0"))
    .AddOptionalArg("ratio", "Aspect-ratio range 'lo, hi' (w / h, log-uniform; text).",
                    std::string("0.75, 1.3333333333333333"))
    .AddOptionalArg("box_scale", "Area range 'lo, hi' of a crop inside a box region (text; see "
                    "windows.box_scale_from_mean_area). Unset: with boxes_store, (min(0.2 / mean area of each "
                    "image's top_k boxes, 1), 1) as the loader derives it; with a boxes input (1, 1), warned.",
                    std::string(""))
    .AddOptionalArg("box_check", "'error' (default): refuse boxes that are not finite, inverted or outside [0, 1] "
                    "(beyond 1e-3), naming the sample -- pixel or xywh boxes; 'clip': accept boxes reaching outside "
                    "the image (clipped to it; non-finite ones are still refused).", std::string("error"))
    .AddOptionalArg("dilate", "delta of obj-obj-dilate, fraction of the image side (text).", std::string("0.1"))
    .AddOptionalArg("shift_range", "'r_min, r_max' pixels of obj-obj-shift (text).", std::string("80, 120"))
    .AddOptionalArg("min_box_size", "Regions smaller than this (pixels per side) are widened.", 224)
    .AddOptionalArg("top_k", "Boxes considered per image (best-first).", 10)
    .AddOptionalArg("num_tries", "RandomResizedCrop tries before the centre fallback (1..10).", 10)
    .AddOptionalArg("flip_p", "Probability of a horizontal flip per view (text).", std::string("0.5"))
    .AddOptionalArg<int64_t>("seed", "Seed of the counter-based keys (>= 0).", 0)
    .AddOptionalArg<int64_t>("epoch", "Epoch of the key (>= 0); an argument input to change it per run.", int64_t{0},
                             true)
    .AddOptionalArg("recipe", "Augmentation recipe: mocov2 or byol (ignored when `aug` is given).",
                    std::string("mocov2"))
    .AddOptionalArg("aug", "Recipe as text: 20 comma-separated numbers, per global view: jitter_p, brightness, "
                    "contrast, saturation, hue, gray_p, blur_p, sigma_lo, sigma_hi, solarize_p (text keeps them "
                    "float64); or 30: then the local views' 10 in the same order (with 20, the local views take "
                    "`recipe`'s local augmentation).", std::string(""))
    .AddOptionalArg("local_crops", "Local (multi-crop) views per sample, 0..16, after the two global views "
                    "(windows._sample_local; 0: the two global views only).", 0)
    .AddOptionalArg("local_scale", "Local-crop area range 'lo, hi', a fraction of its region (text).",
                    std::string("0.05, 0.4"))
    .AddOptionalArg("local_from", "Where local views are drawn: box (the union of the global object views' "
                    "regions), boxes (local view j in proposal (b + j) mod k) or scene (the whole image); box and "
                    "boxes need an object mode.", std::string("box"))
    .AddOptionalArg("boxes_store", "Path of a .boxes store; boxes are looked up by row (the index, or store_row).",
                    std::string(""))
    .AddOptionalArg<int64_t>("store_row", "Row in boxes_store when it differs from the index.", nullptr, true)
    .AddOptionalArg("details", "Add an output (12 + 5 local_crops,) int32: regions (2x4), box_index, fallback, "
                    "shift dx, dy, then per local view its region x1, y1, x2, y2 and box index.", false)
    .AddOptionalArg("resize_rois", "Add an output (V, 4) float32 per view [y1, x_start, y2, x_end] in roi "
                    "coordinates, x swapped when flipped: fn.resize's roi_start / roi_end.", false)
    .AddOptionalArg("blur_kernels", "Add an output (V, W) float32: each view's normalised 1-D Gaussian kernel "
                    "(augment.gaussian_kernels), centred in W = the largest kernel size, zeros outside.", false)
    .AddOptionalArg("image_windows", "Add an output (V, 4) int32: every window [x1, y1, x2, y2) in the whole "
                    "image's pixels (roi + windows), for a pipeline that decodes the whole image.", false);

}  // namespace dali
