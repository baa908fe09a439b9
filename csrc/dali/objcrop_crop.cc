// objcrop_crop.cc -- schema of objcrop__Crop (fn.objcrop.crop) and its CPU backend.
//
// CPU: one task per (sample, view) on DALI's thread pool, local views included, each running objcrop_crop_cpu.h
// (DALI-free, so the standalone kernel check compares the GPU kernels with this very arithmetic) at the view's
// own side.
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
  auto *local = local_size_ > 0 ? &ws.Output<dali::CPUBackend>(2) : nullptr;
  if (local) local->SetLayout("FCHW");
  const int n = images.num_samples(), V = views_;
  auto &pool = ws.GetThreadPool();
  static thread_local CpuBuffers tls;  // DALI's pool threads live as long as the pipeline
  for (int i = 0; i < n; ++i) {
    for (int v = 0; v < V; ++v) {
      const int k = V * i + v;
      OcViewParams &p = plan_.params[k];
      p.image = reinterpret_cast<unsigned long long>(images.raw_tensor(i));
      p.out = ViewOut(out0, out1, local, i, v);
      const oc_i64 cost = static_cast<oc_i64>(p.win[3] - p.win[1]) * p.size + static_cast<oc_i64>(p.size) * p.size;
      pool.AddWork([this, k](int) {
        const OcViewParams &q = plan_.params[k];
        resample_view(q, q.size, tls);
        augment_view(q, plan_.taps.data() + q.blur_offset, norm_, q.size, out_kind_, tls);
      }, cost);
    }
  }
  pool.RunAll();
}

}  // namespace objcrop

namespace dali {  // DALI's registration macros name CPUBackend etc. unqualified

DALI_SCHEMA(objcrop__Crop)
    .DocStr(R"(Fused object-aware crop and augmentation of two views, and of local views (dali_objcrop).

For each sample, every view is cut from the decoded image by its window and resized to ``size`` x
``size`` (local views: ``local_size`` x ``local_size``) with an antialiased triangle filter
(crop-then-resize, PIL BILINEAR semantics), mirrored where ``flip`` says so, colour-jittered with
``fn.color_twist``'s formula (grayscale is saturation 0) and clamped to [0, 255], blurred with a separable
Gaussian (``fn.filter``'s reflect-101 border), solarised and normalised as ``(x - mean) / std`` in pixel
units, in one pass (every view of the batch: one task per view on the CPU, the same two kernel launches
on the GPU).  The draws come from ``fn.objcrop.windows`` (or ``dali_objcrop.augment.sample_aug_params``).

Views: the inputs hold V rows per sample, the two global views first, then M = V - 2 local
(multi-crop) views (``fn.objcrop.windows(local_crops=M)``).  With ``local_size`` 0 (default) V must be 2.

Outputs: the two views, each (3, size, size) per sample (layout CHW); with ``local_size`` > 0 a third,
the local views (M, 3, local_size, local_size) per sample (layout FCHW; M >= 1, the same for every sample
of a batch).  float32, float16, or bfloat16 carried as uint16 bit patterns (DALI 2.4 has no bfloat16
type; in torch: ``.view(torch.bfloat16)``).)")
    .NumInput(4)
    .OutputFn([](const OpSpec &spec) { return spec.GetArgument<int>("local_size") > 0 ? 3 : 2; })
    .InputDox(0, "images", "TensorList", "Decoded images, HWC uint8 RGB (the ROI the windows refer to).")
    .InputDox(1, "windows", "TensorList",
              "(V, 4) int32 per sample: [x1, y1, x2, y2) of each view in the image (V = 2 + local views).")
    .InputDox(2, "flip", "TensorList", "(V,) uint8 per sample: mirror the view horizontally.")
    .InputDox(3, "aug", "TensorList",
              "(V, 9) float32 per sample, per view: colour_applied, brightness, contrast, saturation, "
              "hue_degrees, blur_applied, sigma, blur_window, solarize_applied.")
    .InputDevice(1, 4, InputDevice::CPU)
    .AddArg("size", "Output side in pixels of the two global views (square views).", DALI_INT32)
    .AddOptionalArg("local_size",
                    "Output side in pixels of the local views (inputs' rows 2, 3, ...), the third output; 0 "
                    "(default): no local views, the inputs hold the two global views only.", 0)
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
