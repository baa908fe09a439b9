// objcrop_crop.h -- the fused crop-and-augment DALI operator objcrop__Crop (fn.objcrop.crop).
//
// One class template for both backends: argument parsing, input validation and the per-view parameter
// blocks (OcViewParams, built by objcrop_crop_plan.h, the DALI-free launch plan) are shared; RunImpl is specialised in objcrop_crop.cc (CPU:
// per view on DALI's thread pool) and objcrop_crop_gpu.cc (GPU: the kernels of objcrop_crop_kernels.h on
// ws.stream() for the whole batch).  The schema is in objcrop_crop.cc.
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
    oc_plan_begin(plan_, n, size_, out_kind_, norm_);
    for (int i = 0; i < n; ++i) {
      auto sh = images.tensor_shape(i);
      DALI_ENFORCE(sh.size() == 3 && sh[2] == 3 && sh[0] >= 1 && sh[1] >= 1,
                   dali::make_string("objcrop.crop: sample ", i, ": need an HWC RGB image, got shape ", sh));
      DALI_ENFORCE(windows.tensor_shape(i).num_elements() == 8 && flips.tensor_shape(i).num_elements() == 2 &&
                       aug.tensor_shape(i).num_elements() == 2 * OC_AUG_K,
                   dali::make_string("objcrop.crop: sample ", i, ": windows must be (2, 4), flip (2,) and aug (2, ",
                                     OC_AUG_K, "), got ", windows.tensor_shape(i), ", ", flips.tensor_shape(i),
                                     ", ", aug.tensor_shape(i)));
      const int *w = windows.template tensor<int>(i);
      const uint8_t *f = flips.template tensor<uint8_t>(i);
      const float *a = aug.template tensor<float>(i);
      for (int v = 0; v < 2; ++v) {
        std::string err = oc_plan_view(plan_, i, v, static_cast<int>(sh[1]), static_cast<int>(sh[0]), w + 4 * v,
                                       f[v], a + OC_AUG_K * v, contrast_center_);
        DALI_ENFORCE(err.empty(), "objcrop.crop: " + err);
      }
    }
    output_desc.resize(2);
    for (int v = 0; v < 2; ++v) {
      output_desc[v].shape = dali::uniform_list_shape(n, dali::TensorShape<3>(3, size_, size_));
      output_desc[v].type = OutType(out_kind_);
    }
    return true;
  }

  void RunImpl(dali::Workspace &ws) override;

  int size_ = 0;
  int out_kind_ = OC_OUT_F32;
  float contrast_center_ = 128.0f;
  float norm_[6] = {0, 0, 0, 1, 1, 1};
  OcCropPlan plan_;  // per-view blocks and taps from SetupImpl; addresses, grids and the packed block in RunImpl
  dali::DeviceBuffer<unsigned long long> packed_dev_;   // GPU backend: plan_.packed on the device
  dali::DeviceBuffer<float> scratch_dev_;               // GPU backend: the blur's intermediate rows
};

}  // namespace objcrop

#endif  // OBJCROP_CROP_H
