// objcrop_crop.h -- the fused crop-and-augment DALI operator objcrop__Crop (fn.objcrop.crop).
//
// One class template for both backends: argument parsing, input validation and the per-view parameter
// blocks (OcViewParams, built by objcrop_crop_plan.h, the DALI-free launch plan) are shared; RunImpl is
// specialised in objcrop_crop.cc (CPU: per (sample, view) on DALI's thread pool) and objcrop_crop_gpu.cc (GPU:
// the kernels of objcrop_crop_kernels.h on ws.stream() for the whole batch, every view).  The schema is in
// objcrop_crop.cc.
//
// Views: the inputs hold V = 2 + M rows per sample (windows (V, 4), flip (V,), aug (V, 9)): the two global
// views, then M local (multi-crop) views.  local_size == 0: V must be 2, two outputs.  local_size > 0: a third
// output, (M, 3, local_size, local_size) per sample, M >= 1 and the same for every sample of the batch.
#ifndef OBJCROP_CROP_H
#define OBJCROP_CROP_H

#include <string>
#include <type_traits>
#include <vector>

#include "dali/core/dev_buffer.h"
#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"
#include "objcrop_crop_plan.h"

// objcrop_crop_kernels.cu: the two kernels of a finished plan on `stream` (objcrop_crop_launch.h), compiled by nvcc.
cudaError_t oc_crop_launch_kernels(const OcCropPlan &plan, const void *d_packed, float *d_scratch,
                                   cudaStream_t stream);

namespace objcrop {

// The output element type asked for by the `dtype` argument and the DALI type that carries it (DALI 2.4
// has no bfloat16 type: bfloat16 views travel as UINT16 bit patterns, torch: .view(torch.bfloat16)).
inline int OutKind(const std::string &dtype) {
  if (dtype == "float32" || dtype == "float") return OC_OUT_F32;
  if (dtype == "float16" || dtype == "half") return OC_OUT_F16;
  if (dtype == "bfloat16") return OC_OUT_BF16;
  DALI_FAIL(dali::make_string("objcrop.crop: dtype must be 'float32', 'float16' or 'bfloat16', got '", dtype,
                              "'"));
}

inline dali::DALIDataType OutType(int kind) {
  return kind == OC_OUT_F32 ? DALI_FLOAT : (kind == OC_OUT_F16 ? DALI_FLOAT16 : DALI_UINT16);
}

template <typename Backend>
class ObjCropCrop : public dali::StatelessOperator<Backend> {
 public:
  explicit ObjCropCrop(const dali::OpSpec &spec) : dali::StatelessOperator<Backend>(spec) {
    size_ = spec.GetArgument<int>("size");
    DALI_ENFORCE(size_ >= 1, dali::make_string("objcrop.crop: size must be >= 1, got ", size_));
    local_size_ = spec.GetArgument<int>("local_size");
    DALI_ENFORCE(local_size_ >= 0,
                 dali::make_string("objcrop.crop: local_size must be >= 0 (0: no local views), got ", local_size_));
    out_kind_ = OutKind(spec.GetArgument<std::string>("dtype"));
    contrast_center_ = spec.GetArgument<float>("contrast_center");
    auto mean = spec.GetRepeatedArgument<float>("mean");
    auto stdev = spec.GetRepeatedArgument<float>("std");
    if (mean.size() == 1) mean.resize(3, mean[0]);
    if (stdev.size() == 1) stdev.resize(3, stdev[0]);
    DALI_ENFORCE(mean.size() == 3 && stdev.size() == 3,
                 "objcrop.crop: mean and std need 1 or 3 values (RGB, pixel units 0..255)");
    for (int c = 0; c < 3; ++c) {
      DALI_ENFORCE(stdev[c] > 0, dali::make_string("objcrop.crop: std must be positive, got ", stdev[c]));
      norm_[c] = mean[c];
      norm_[3 + c] = 1.0f / stdev[c];
    }
    if (std::is_same<Backend, dali::GPUBackend>::value) {  // the kernels' limits, at pipeline build
      std::string err = oc_check_limits(spec.GetArgument<int>("max_batch_size"), size_);
      if (err.empty() && local_size_ > 0)
        err = oc_check_limits(spec.GetArgument<int>("max_batch_size"), local_size_, 2, "local_size");
      DALI_ENFORCE(err.empty(), "objcrop.crop (GPU): " + err);
    }
  }

 protected:
  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    const auto &images = ws.Input<Backend>(0);
    int n = images.num_samples();
    const auto &windows = ws.Input<dali::CPUBackend>(1);
    const auto &flips = ws.Input<dali::CPUBackend>(2);
    const auto &aug = ws.Input<dali::CPUBackend>(3);
    DALI_ENFORCE(images.type() == DALI_UINT8,
                 dali::make_string("objcrop.crop: images must be uint8, got ", images.type()));
    DALI_ENFORCE(windows.type() == DALI_INT32 && flips.type() == DALI_UINT8 &&
                     aug.type() == DALI_FLOAT,
                 dali::make_string("objcrop.crop: windows must be int32, flip uint8 and aug float32, got ",
                                   windows.type(), ", ", flips.type(), ", ", aug.type()));
    DALI_ENFORCE(windows.num_samples() == n && flips.num_samples() == n && aug.num_samples() == n,
                 "objcrop.crop: images, windows, flip and aug need the same batch size");
    // views per sample: 2 global + M local, the same M for every sample (one output of M views per sample)
    // (an empty batch has no rows to count, and malformed windows are refused below, naming the shapes)
    const auto ne0 = n > 0 ? windows.tensor_shape(0).num_elements() : 0;
    const bool counted = ne0 % 4 == 0 && ne0 >= 8;
    views_ = counted ? static_cast<int>(ne0 / 4) : (local_size_ > 0 ? 3 : 2);
    if (counted && local_size_ == 0) {
      DALI_ENFORCE(views_ == 2, dali::make_string("objcrop.crop: sample 0: windows hold ", views_, " views (2 global + ",
                                                  views_ - 2, " local), but local_size is 0: pass local_size (the "
                                                  "local views' side, e.g. CropConfig.local_size) for local views"));
    } else if (counted) {
      DALI_ENFORCE(views_ > 2, dali::make_string("objcrop.crop: local_size is ", local_size_, " but sample 0's "
                                                 "windows hold 2 views, no local view (fn.objcrop.windows makes "
                                                 "them with local_crops > 0); local_size=0 makes the two views only"));
    }
    const int V = views_;
    oc_plan_begin(plan_, n, size_, out_kind_, norm_, V - 2, local_size_);
    for (int i = 0; i < n; ++i) {
      auto sh = images.tensor_shape(i);
      DALI_ENFORCE(sh.size() == 3 && sh[2] == 3 && sh[0] >= 1 && sh[1] >= 1,
                   dali::make_string("objcrop.crop: sample ", i, ": need an HWC RGB image, got shape ", sh));
      const auto wn = windows.tensor_shape(i).num_elements();
      if (i > 0 && wn != 4 * V && wn % 4 == 0 && wn >= 8)
        DALI_FAIL(dali::make_string("objcrop.crop: sample ", i, " has ", wn / 4 - 2, " local views, sample 0 has ",
                                    V - 2, ": every sample of a batch needs the same number of local views "
                                    "(local_crops)"));
      DALI_ENFORCE(wn == 4 * V && flips.tensor_shape(i).num_elements() == V &&
                       aug.tensor_shape(i).num_elements() == V * OC_AUG_K,
                   dali::make_string("objcrop.crop: sample ", i, ": windows must be (", V, ", 4), flip (", V,
                                     ",) and aug (", V, ", ", OC_AUG_K, "), got ", windows.tensor_shape(i), ", ",
                                     flips.tensor_shape(i), ", ", aug.tensor_shape(i)));
      const int *w = windows.template tensor<int>(i);
      const uint8_t *f = flips.template tensor<uint8_t>(i);
      const float *a = aug.template tensor<float>(i);
      for (int v = 0; v < V; ++v) {
        std::string err = oc_plan_view(plan_, i, v, static_cast<int>(sh[1]), static_cast<int>(sh[0]), w + 4 * v,
                                       f[v], a + OC_AUG_K * v, contrast_center_);
        DALI_ENFORCE(err.empty(), "objcrop.crop: " + err);
      }
    }
    output_desc.resize(local_size_ > 0 ? 3 : 2);
    for (int v = 0; v < 2; ++v) {
      output_desc[v].shape = dali::uniform_list_shape(n, dali::TensorShape<3>(3, size_, size_));
      output_desc[v].type = OutType(out_kind_);
    }
    if (local_size_ > 0) {
      output_desc[2].shape = dali::uniform_list_shape(n, dali::TensorShape<4>(V - 2, 3, local_size_, local_size_));
      output_desc[2].type = OutType(out_kind_);
    }
    return true;
  }

  // The output address of view v of sample i (local views: one after another in the sample's (M, 3, L, L)).
  template <typename TL>
  unsigned long long ViewOut(TL &out0, TL &out1, TL *local, int i, int v) const {
    if (v < 2) return reinterpret_cast<unsigned long long>((v == 0 ? out0 : out1).raw_mutable_tensor(i));
    const size_t bytes = (out_kind_ == OC_OUT_F32 ? 4 : 2) * 3 * static_cast<size_t>(local_size_) * local_size_;
    return reinterpret_cast<unsigned long long>(static_cast<unsigned char *>(local->raw_mutable_tensor(i)) +
                                                (v - 2) * bytes);
  }

  void RunImpl(dali::Workspace &ws) override;

  int size_ = 0;
  int local_size_ = 0;  // the local views' side; 0: none (two outputs)
  int views_ = 2;       // views per sample of the current batch (2 + local views)
  int out_kind_ = OC_OUT_F32;
  float contrast_center_ = 128.0f;
  float norm_[6] = {0, 0, 0, 1, 1, 1};
  OcCropPlan plan_;  // per-view blocks and taps from SetupImpl; addresses, grids and the packed block in RunImpl
  dali::DeviceBuffer<unsigned long long> packed_dev_;   // GPU backend: plan_.packed on the device
  dali::DeviceBuffer<float> scratch_dev_;               // GPU backend: the blur's intermediate rows
};

}  // namespace objcrop

#endif  // OBJCROP_CROP_H
