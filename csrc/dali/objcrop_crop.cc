// objcrop_crop.cc -- schema of objcrop__Crop (fn.objcrop.crop) and its CPU backend.
//
// CPU: one task per (sample, view) on DALI's thread pool, each running objcrop_crop_cpu.h (DALI-free, so the
// standalone kernel check compares the GPU kernels with this very arithmetic).
#include "objcrop_crop.h"
#include "objcrop_crop_cpu.h"

namespace objcrop {

template <>
void ObjCropCrop<dali::CPUBackend>::RunImpl(dali::Workspace &ws) {
  const auto &images = ws.Input<dali::CPUBackend>(0);
  auto &out0 = ws.Output<dali::CPUBackend>(0);
  auto &out1 = ws.Output<dali::CPUBackend>(1);
  out0.SetLayout("CHW");
  out1.SetLayout("CHW");
  const int n = images.num_samples();
  auto &pool = ws.GetThreadPool();
  static thread_local CpuBuffers tls;  // DALI's pool threads live as long as the pipeline
  for (int i = 0; i < n; ++i) {
    for (int v = 0; v < 2; ++v) {
      OcViewParams &p = plan_.params[2 * i + v];
      p.image = reinterpret_cast<unsigned long long>(images.raw_tensor(i));
      p.out = reinterpret_cast<unsigned long long>((v == 0 ? out0 : out1).raw_mutable_tensor(i));
      const oc_i64 cost = static_cast<oc_i64>(p.win[3] - p.win[1]) * size_ + static_cast<oc_i64>(size_) * size_;
      pool.AddWork([this, i, v](int) {
        const OcViewParams &q = plan_.params[2 * i + v];
        resample_view(q, size_, tls);
        augment_view(q, plan_.taps.data() + q.blur_offset, norm_, size_, out_kind_, tls);
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
