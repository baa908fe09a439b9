// crop_check.cpp -- the standalone check of fn.objcrop.crop's GPU kernels: no DALI, nothing but a C++/CUDA
// compiler and this repository (csrc/check/run.sh builds and runs it).
//
// Each case builds a batch (images, windows, flips, augmentation rows) from a fixed seed, plans it with the
// operator's own launch plan (csrc/dali/objcrop_crop_plan.h), runs the kernels through a backend (the real
// GPU with the operator's launch code, crop_check_gpu.cu; or the serial emulation, crop_emulate.cpp), and
// compares every output value with the CPU operator's arithmetic (csrc/dali/objcrop_crop_cpu.h) on the same
// plan.  A batch holds 2 global views per sample and, in the local_* cases, M local views of another side
// (all in the same two launches).  Reported per case: the share of bit-identical values, the largest
// difference in pixel levels (1 level = 1/255 of the range) and a checksum of the kernels' output bytes; a
// case passes at <= 1 level.  Cases that must be refused (over the limits)
// pass when the plan refuses them by name.
//
//   crop_check [--cases all|small|NAME[,NAME...]] [--json FILE] [--list]
#include <cmath>
#include <cstdio>
#include <array>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "crop_check.h"
#include "objcrop_crop_cpu.h"

namespace {

// SplitMix64: every case is a pure function of its seed.
struct Rng {
  unsigned long long s;
  unsigned long long next() {
    unsigned long long z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  int below(int n) { return static_cast<int>(next() % static_cast<unsigned long long>(n)); }
};

// One sample's views: 2 global, then the batch's local views.
struct Sample {
  int w, h;
  int image;       // index into the batch's distinct images
  std::vector<std::array<int, 4>> win;
  std::vector<int> flip;
  std::vector<std::array<float, OC_AUG_K>> aug;
};

struct Batch {
  std::vector<std::vector<unsigned char>> images;  // distinct images (HWC RGB); samples may share one
  std::vector<std::pair<int, int>> image_sizes;    // (w, h)
  std::vector<Sample> samples;
  int size = 0;                                    // the global views' side
  int local_views = 0, local_size = 0;             // local views per sample and their side
  int kind = OC_OUT_F32;
  int views() const { return 2 + local_views; }
  int view_size(int v) const { return v < 2 ? size : local_size; }
};

struct Case {
  std::string name;
  bool small;            // run under compute-sanitizer
  bool must_refuse;      // the plan must refuse it (limits)
  std::function<Batch()> make;
};

// A photo-like image: smooth gradients, a few hard edges, noise.
std::vector<unsigned char> make_image(int w, int h, unsigned long long seed) {
  Rng r{seed};
  std::vector<unsigned char> im(static_cast<size_t>(w) * h * 3);
  const double fx = 0.5 + r.uniform() * 6, fy = 0.5 + r.uniform() * 6;
  const int ex = r.below(w + 1), ey = r.below(h + 1);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) {
        double v = 128 + 90 * std::sin(fx * 6.283 * x / w + c) * std::cos(fy * 6.283 * y / h - c);
        if ((x < ex) != (y < ey)) v = 255 - v;
        v += (r.uniform() - 0.5) * 40;
        im[(static_cast<size_t>(y) * w + x) * 3 + c] = static_cast<unsigned char>(v < 0 ? 0 : (v > 255 ? 255 : v));
      }
  return im;
}

// One view's augmentation row as the MoCo-v2 recipe draws it (augment.sample_aug_params' ranges), with the
// blur window 2 * ceil(3 sigma) + 1 unless `window` overrides it.
void random_aug(Rng& r, float* a, double blur_p = 0.5, int window = 0) {
  a[OC_AUG_COLOUR] = r.uniform() < 0.8;
  a[OC_AUG_BRIGHTNESS] = a[OC_AUG_COLOUR] ? static_cast<float>(0.6 + 0.8 * r.uniform()) : 1.0f;
  a[OC_AUG_CONTRAST] = a[OC_AUG_COLOUR] ? static_cast<float>(0.6 + 0.8 * r.uniform()) : 1.0f;
  a[OC_AUG_SATURATION] = a[OC_AUG_COLOUR] ? (r.uniform() < 0.2 ? 0.0f : static_cast<float>(0.6 + 0.8 * r.uniform()))
                                          : 1.0f;
  a[OC_AUG_HUE] = a[OC_AUG_COLOUR] ? static_cast<float>(-36 + 72 * r.uniform()) : 0.0f;
  a[OC_AUG_BLUR] = r.uniform() < blur_p;
  const double sigma = 0.1 + 1.9 * r.uniform();
  a[OC_AUG_SIGMA] = static_cast<float>(sigma);
  a[OC_AUG_BLUR_WINDOW] = static_cast<float>(window ? window : 2 * static_cast<int>(std::ceil(3 * sigma)) + 1);
  if (!a[OC_AUG_BLUR]) a[OC_AUG_SIGMA] = a[OC_AUG_BLUR_WINDOW] = 0.0f;
  a[OC_AUG_SOLARIZE] = r.uniform() < 0.2;
}

void random_window(Rng& r, int w, int h, int* win) {
  int x1 = r.below(w), y1 = r.below(h);
  win[0] = x1;
  win[1] = y1;
  win[2] = x1 + 1 + r.below(w - x1);
  win[3] = y1 + 1 + r.below(h - y1);
}

// n samples over the given distinct image sizes (sample i uses image i % sizes), random windows and draws.
Batch random_batch(unsigned long long seed, int n, int size, int kind, const std::vector<std::pair<int, int>>& sizes,
                   double blur_p = 0.5, int window = 0) {
  Batch b;
  Rng r{seed};
  b.size = size;
  b.kind = kind;
  for (size_t k = 0; k < sizes.size(); ++k) {
    b.images.push_back(make_image(sizes[k].first, sizes[k].second, seed * 1000 + k));
    b.image_sizes.push_back(sizes[k]);
  }
  b.samples.resize(n);
  for (int i = 0; i < n; ++i) {
    Sample& s = b.samples[i];
    s.image = i % static_cast<int>(sizes.size());
    s.w = sizes[s.image].first;
    s.h = sizes[s.image].second;
    s.win.resize(2);
    s.flip.resize(2);
    s.aug.resize(2);
    for (int v = 0; v < 2; ++v) {
      random_window(r, s.w, s.h, s.win[v].data());
      s.flip[v] = r.uniform() < 0.5;
      random_aug(r, s.aug[v].data(), blur_p, window);
    }
  }
  return b;
}

// random_batch's global views (the same draws) and m local views of side local_size per sample, drawn from a
// second stream: blur with probability local_blur_p, every 5th local view of a sample blurred whatever the draw.
Batch local_batch(unsigned long long seed, int n, int size, int m, int local_size, int kind,
                  const std::vector<std::pair<int, int>>& sizes, double blur_p = 0.5, double local_blur_p = 0.5) {
  Batch b = random_batch(seed, n, size, kind, sizes, blur_p);
  b.local_views = m;
  b.local_size = local_size;
  Rng r{seed ^ 0x6c6f63616cull};
  for (Sample& s : b.samples) {
    for (int j = 0; j < m; ++j) {
      std::array<int, 4> w;
      std::array<float, OC_AUG_K> a;
      random_window(r, s.w, s.h, w.data());
      s.win.push_back(w);
      s.flip.push_back(r.uniform() < 0.5);
      random_aug(r, a.data(), j % 5 == 0 ? 1.0 : local_blur_p);
      s.aug.push_back(a);
    }
  }
  return b;
}

void set_window(Sample& s, int v, int x1, int y1, int x2, int y2) {  // view v's window
  s.win[v][0] = x1;
  s.win[v][1] = y1;
  s.win[v][2] = x2;
  s.win[v][3] = y2;
}

std::vector<Case> all_cases() {
  const int F32 = OC_OUT_F32, F16 = OC_OUT_F16, BF16 = OC_OUT_BF16;
  std::vector<Case> cs;
  cs.push_back({"odd_shapes", true, false, [=] {
                  return random_batch(1, 7, 37, F32, {{1, 1}, {3, 2}, {37, 53}, {101, 67}, {640, 480}, {2, 999},
                                                      {999, 2}});
                }});
  cs.push_back({"special_windows", true, false, [=] {
                  // 1x1 windows, whole images, enlarging windows (smaller than the output), edge strips
                  Batch b = random_batch(2, 6, 64, F32, {{50, 40}, {640, 480}, {1, 1}});
                  set_window(b.samples[0], 0, 7, 9, 8, 10);
                  set_window(b.samples[0], 1, 0, 0, 50, 40);
                  set_window(b.samples[1], 0, 0, 0, 640, 480);
                  set_window(b.samples[1], 1, 300, 200, 305, 203);
                  set_window(b.samples[2], 0, 0, 0, 1, 1);
                  set_window(b.samples[2], 1, 0, 0, 1, 1);
                  set_window(b.samples[3], 0, 49, 0, 50, 40);
                  set_window(b.samples[3], 1, 0, 39, 50, 40);
                  set_window(b.samples[4], 0, 639, 479, 640, 480);
                  set_window(b.samples[4], 1, 0, 0, 64, 64);
                  return b;
                }});
  for (int kind : {F32, F16, BF16}) {
    const char* name = kind == F32 ? "dtype_float32" : (kind == F16 ? "dtype_float16" : "dtype_bfloat16");
    cs.push_back({name, true, false, [=] { return random_batch(3 + kind, 8, 96, kind, {{640, 480}, {333, 517}}); }});
  }
  for (int s : {1, 2, 7, 64}) {
    cs.push_back({"size_" + std::to_string(s), true, false,
                  [=] { return random_batch(10 + s, 5, s, F32, {{640, 480}, {5, 3}}); }});
  }
  cs.push_back({"size_4096_largest", false, false,
                [=] { return random_batch(20, 2, OC_MAX_SIZE, BF16, {{800, 600}}, 1.0); }});
  cs.push_back({"blur_wider_than_output", true, false,
                [=] { return random_batch(21, 4, 7, F32, {{120, 90}}, 1.0, 31); }});
  cs.push_back({"blur_window_largest", true, false,
                [=] { return random_batch(22, 2, 9, F32, {{64, 64}}, 1.0, OC_MAX_BLUR_WINDOW); }});
  cs.push_back({"batch_grid_limit", false, false,
                [=] { return random_batch(23, OC_MAX_BATCH, 1, F16, {{2, 2}, {3, 1}, {1, 4}}); }});
  cs.push_back({"photo_4000x3000_to_224", false, false, [=] {
                  Batch b = random_batch(24, 2, 224, F32, {{4000, 3000}});
                  set_window(b.samples[0], 0, 0, 0, 4000, 3000);
                  return b;
                }});
  cs.push_back({"batch_256_at_224", false, false, [=] {
                  return random_batch(25, 256, 224, F32, {{640, 480}, {480, 640}, {640, 427}, {500, 375}, {612, 612},
                                                          {640, 360}, {427, 640}, {640, 480}});
                }});
  // local (multi-crop) views: V = 2 + M views of two sides in the same two launches
  cs.push_back({"local_2x224_6x96", false, false, [=] {
                  return local_batch(40, 4, 224, 6, 96, F32, {{640, 480}, {333, 517}, {96, 96}});
                }});
  cs.push_back({"local_odd_sizes", true, false, [=] {
                  Batch b = local_batch(41, 5, 37, 3, 13, F32, {{1, 1}, {101, 67}, {3, 2}, {640, 480}, {2, 99}});
                  set_window(b.samples[1], 2, 0, 0, 101, 67);   // a whole image, a 1x1 window, enlarging ones
                  set_window(b.samples[1], 3, 50, 30, 51, 31);
                  set_window(b.samples[3], 4, 100, 100, 105, 103);
                  return b;
                }});
  cs.push_back({"local_larger_than_global", true, false, [=] {
                  return local_batch(42, 3, 24, 4, 57, F16, {{640, 480}, {64, 48}}, 0.5, 1.0);
                }});
  cs.push_back({"local_16_views", false, false, [=] {
                  return local_batch(43, 6, 64, 16, 32, BF16, {{500, 375}, {612, 612}, {37, 53}});
                }});
  cs.push_back({"local_only_local_blur", true, false, [=] {
                  return local_batch(44, 3, 40, 5, 19, F32, {{200, 150}}, 0.0, 0.5);   // no global view blurred
                }});
  cs.push_back({"local_size_1", true, false, [=] {
                  return local_batch(45, 3, 9, 2, 1, F32, {{30, 20}, {1, 1}}, 1.0, 1.0);
                }});
  cs.push_back({"local_batch_64_at_224_96", false, false, [=] {
                  return local_batch(46, 64, 224, 8, 96, F32, {{640, 480}, {480, 640}, {640, 427}, {500, 375}});
                }});
  // over the limits: the plan must refuse them by name
  cs.push_back({"refuse_size_over_limit", true, true,
                [=] { return random_batch(30, 1, OC_MAX_SIZE + 1, F32, {{8, 8}}); }});
  cs.push_back({"refuse_batch_over_limit", true, true,
                [=] { return random_batch(31, OC_MAX_BATCH + 1, 1, F32, {{2, 2}}); }});
  cs.push_back({"refuse_local_size_over_limit", true, true,
                [=] { return local_batch(32, 1, 8, 1, OC_MAX_SIZE + 1, F32, {{8, 8}}); }});
  return cs;
}

float decode(const unsigned char* base, size_t i, int kind) {
  if (kind == OC_OUT_F32) {
    float f;
    std::memcpy(&f, base + 4 * i, 4);
    return f;
  }
  unsigned short h;
  std::memcpy(&h, base + 2 * i, 2);
  unsigned int bits;
  if (kind == OC_OUT_BF16) {
    bits = static_cast<unsigned int>(h) << 16;
  } else {  // IEEE half -> float
    unsigned int sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
      if (man == 0) {
        bits = sign << 31;
      } else {
        int e = -1;
        do { ++e; man <<= 1; } while (!(man & 0x400u));
        bits = (sign << 31) | ((127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
      }
    } else if (exp == 31) {
      bits = (sign << 31) | 0x7f800000u | (man << 13);
    } else {
      bits = (sign << 31) | ((exp + 127 - 15) << 23) | (man << 13);
    }
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct Result {
  std::string name, error;
  int n = 0, size = 0, kind = 0, local_views = 0, local_size = 0;
  double exact = 0, max_levels = 0, kernel_ms = 0;
  long long values = 0;
  unsigned long long checksum = 0;  // FNV-1a of the kernels' output bytes (equal across builds: same pixels)
  bool ok = false;
};

const float kNorm[6] = {0.485f * 255, 0.456f * 255, 0.406f * 255, 1 / (0.229f * 255), 1 / (0.224f * 255),
                        1 / (0.225f * 255)};

Result run_case(const Case& c) {
  Result res;
  Batch b = c.make();
  const int n = static_cast<int>(b.samples.size()), S = b.size;
  res.name = c.name;
  res.n = n;
  res.size = S;
  res.kind = b.kind;
  res.local_views = b.local_views;
  res.local_size = b.local_size;
  // the images arena: each distinct image once
  std::vector<unsigned char> arena;
  std::vector<size_t> image_off;
  for (auto& im : b.images) {
    image_off.push_back(arena.size());
    arena.insert(arena.end(), im.begin(), im.end());
  }
  const size_t elem = b.kind == OC_OUT_F32 ? 4 : 2;
  const int V = b.views();
  // the outputs arena: sample by sample, view by view, each (3, side, side) of its own side
  std::vector<size_t> out_off(static_cast<size_t>(V) * n + 1, 0);
  for (int k = 0; k < V * n; ++k) {
    const size_t side = static_cast<size_t>(b.view_size(k % V));
    out_off[k + 1] = out_off[k] + elem * 3 * side * side;
  }
  const size_t out_bytes = out_off.back();
  OcCropPlan plan;
  oc_plan_begin(plan, n, S, b.kind, kNorm, b.local_views, b.local_size);
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < V; ++v) {
      const Sample& s = b.samples[i];
      std::string err = oc_plan_view(plan, i, v, s.w, s.h, s.win[v].data(), s.flip[v], s.aug[v].data(), 128.0f);
      if (!err.empty()) {
        res.error = "plan_view: " + err;
        return res;
      }
      OcViewParams& q = plan.params[static_cast<size_t>(V) * i + v];
      if (q.size != b.view_size(v)) {
        res.error = "plan_view: view " + std::to_string(v) + " planned at side " + std::to_string(q.size) +
                    ", the case asks " + std::to_string(b.view_size(v));
        return res;
      }
      q.image = image_off[s.image];                 // offsets: each backend rebases
      q.out = out_off[static_cast<size_t>(V) * i + v];
    }
  if (c.must_refuse) {
    OcCropPlan copy = plan;
    std::string err = oc_plan_finish(copy);
    res.ok = !err.empty();
    res.error = res.ok ? "refused as it must be: " + err : "over the limits but not refused";
    return res;
  }
  std::vector<unsigned char> got;
  std::string err = oc_check_backend_run(plan, arena, out_bytes, &got, &res.kernel_ms);
  if (!err.empty()) {
    res.error = err;
    return res;
  }
  // the CPU operator's arithmetic on the same per-view blocks, each view at the side the case asks
  std::vector<unsigned char> want(out_bytes);
  objcrop::CpuBuffers buf;
  for (int k = 0; k < V * n; ++k) {
    OcViewParams q = plan.params[k];
    const int side = b.view_size(k % V);
    q.image += reinterpret_cast<unsigned long long>(arena.data());
    q.out += reinterpret_cast<unsigned long long>(want.data());
    objcrop::resample_view(q, side, buf);
    objcrop::augment_view(q, plan.taps.data() + q.blur_offset, plan.norm, side, b.kind, buf);
  }
  const size_t count = out_bytes / elem;
  long long same = 0;
  double worst = 0;
  for (int k = 0; k < V * n; ++k) {
    const size_t plane = static_cast<size_t>(b.view_size(k % V)) * b.view_size(k % V);
    for (size_t i = out_off[k] / elem, e = out_off[k + 1] / elem, j = 0; i < e; ++i, ++j) {
      if (std::memcmp(got.data() + i * elem, want.data() + i * elem, elem) == 0) {
        ++same;
        continue;
      }
      const int c3 = static_cast<int>(j / plane);
      const double a = decode(got.data(), i, b.kind), w = decode(want.data(), i, b.kind);
      const double levels = std::isfinite(a) ? std::fabs(a - w) / kNorm[3 + c3] : INFINITY;  // back to pixel levels
      if (!(levels <= worst)) worst = levels;
    }
  }
  res.values = static_cast<long long>(count);
  res.checksum = 0xcbf29ce484222325ull;
  for (unsigned char byte : got) res.checksum = (res.checksum ^ byte) * 0x100000001b3ull;
  res.exact = count ? static_cast<double>(same) / count : 1.0;
  res.max_levels = worst;
  res.ok = worst <= 1.0;
  return res;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if (ch == '\n') { o += "\\n"; continue; }
    o += ch;
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = "all", json;
  bool list = false;
  for (int a = 1; a < argc; ++a) {
    std::string s = argv[a];
    if (s == "--cases" && a + 1 < argc) which = argv[++a];
    else if (s == "--json" && a + 1 < argc) json = argv[++a];
    else if (s == "--list") list = true;
    else {
      std::fprintf(stderr, "usage: crop_check [--cases all|small|NAME[,NAME...]] [--json FILE] [--list]\n");
      return 2;
    }
  }
  std::vector<Case> cases;
  for (const Case& c : all_cases()) {
    bool take = which == "all" || (which == "small" && c.small) || ("," + which + ",").find("," + c.name + ",") !=
                                                                       std::string::npos;
    if (take) cases.push_back(c);
    if (list) std::printf("%s%s\n", c.name.c_str(), c.small ? " (small)" : "");
  }
  if (list) return 0;
  if (cases.empty()) {
    std::fprintf(stderr, "crop_check: no case matches '%s' (--list names them)\n", which.c_str());
    return 2;
  }
  const std::string backend = oc_check_backend_name();
  std::string out = "{\"backend\": \"" + json_escape(backend) + "\", \"cases\": [";
  int failed = 0;
  for (size_t k = 0; k < cases.size(); ++k) {
    Result r = run_case(cases[k]);
    failed += !r.ok;
    const char* dt = r.kind == OC_OUT_F32 ? "float32" : (r.kind == OC_OUT_F16 ? "float16" : "bfloat16");
    char local[32] = "";
    if (r.local_views) std::snprintf(local, sizeof local, "+%dx%d", r.local_views, r.local_size);
    std::printf("%-28s %-5s n=%-6d size=%-5d%-8s %-8s exact %.6f  max diff %.4f levels  kernels %.3f ms  %016llx  %s\n",
                r.name.c_str(), r.ok ? "ok" : "FAIL", r.n, r.size, local, dt, r.exact, r.max_levels, r.kernel_ms,
                r.checksum, r.error.c_str());
    std::fflush(stdout);
    char num[512];
    std::snprintf(num, sizeof num,
                  "{\"case\": \"%s\", \"ok\": %s, \"n\": %d, \"size\": %d, \"local_views\": %d, \"local_size\": %d, "
                  "\"dtype\": \"%s\", \"values\": %lld, "
                  "\"exact_fraction\": %.9f, \"max_diff_levels\": %.6g, \"kernel_ms\": %.4f, \"checksum\": \"%016llx\", ",
                  r.name.c_str(), r.ok ? "true" : "false", r.n, r.size, r.local_views, r.local_size, dt, r.values,
                  r.exact,
                  std::isfinite(r.max_levels) ? r.max_levels : 1e30, r.kernel_ms, r.checksum);
    out += std::string(k ? ", " : "") + num + "\"note\": \"" + json_escape(r.error) + "\"}";
  }
  out += "], \"failed\": " + std::to_string(failed) + "}\n";
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "crop_check: cannot write %s\n", json.c_str());
      return 2;
    }
    std::fputs(out.c_str(), f);
    std::fclose(f);
  }
  std::printf("crop_check (%s): %zu cases, %d failed\n", backend.c_str(), cases.size(), failed);
  return failed ? 1 : 0;
}
