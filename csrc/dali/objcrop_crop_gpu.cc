// objcrop_crop_gpu.cc -- GPU backend of objcrop__Crop (fn.objcrop.crop); the schema is in objcrop_crop.cc.
//
// Host code only (g++, part of the CUDA build: build.py compiles *_gpu.cc only with the *.cu): the kernels
// and their launch are in objcrop_crop_kernels.cu, the one file nvcc compiles for every architecture, kept
// free of DALI's heavy headers so that a build for sm_75 ... sm_120 + PTX stays quick.
//
// Per batch: the launch plan (objcrop_crop_plan.h; its per-view blocks, global and local views, were built in
// SetupImpl from the CPU inputs windows / flip / aug) gets the image and output addresses, scratch offsets,
// grids and shared memory; its packed block (parameters, Gaussian taps, blurred views and their first blur
// blocks, normalisation) goes to the device in one copy, into a device buffer the operator keeps, as does the
// blur's intermediate buffer (S x S x 3 floats per blurred view of side S), and objcrop_crop_launch.h launches
// the two kernels on ws.stream(), once for every view of the batch.
// The standalone kernel check (csrc/check/) runs the same plan and launch code with no DALI.
#include <vector>

#include "dali/core/cuda_error.h"
#include "objcrop_crop.h"

namespace objcrop {

template <>
void ObjCropCrop<dali::GPUBackend>::RunImpl(dali::Workspace &ws) {
  const auto &images = ws.Input<dali::GPUBackend>(0);
  auto &out0 = ws.Output<dali::GPUBackend>(0);
  auto &out1 = ws.Output<dali::GPUBackend>(1);
  out0.SetLayout("CHW");
  out1.SetLayout("CHW");
  auto *local = local_size_ > 0 ? &ws.Output<dali::GPUBackend>(2) : nullptr;
  if (local) local->SetLayout("FCHW");
  const int n = images.num_samples(), V = views_;
  if (n == 0) return;
  cudaStream_t stream = ws.stream();
  for (int i = 0; i < n; ++i) {
    for (int v = 0; v < V; ++v) {
      OcViewParams &p = plan_.params[static_cast<size_t>(V) * i + v];
      p.image = reinterpret_cast<unsigned long long>(images.raw_tensor(i));
      p.out = ViewOut(out0, out1, local, i, v);
    }
  }
  std::string err = oc_plan_finish(plan_);
  DALI_ENFORCE(err.empty(), "objcrop.crop (GPU): " + err);
  // the packed block and the blur's scratch live in device buffers the operator keeps across batches (grown,
  // never shrunk): no per-batch allocation of the scratch (~300 MB at 256 samples, 224 px, every view blurred)
  // and no pinned staging buffer released in host order
  packed_dev_.from_host(plan_.packed.data(), plan_.packed.size(), dali::AccessOrder(stream));
  if (scratch_dev_.size() < plan_.scratch_floats) scratch_dev_.resize(plan_.scratch_floats, dali::AccessOrder(stream));
  const unsigned long long *d_packed = packed_dev_.data();
  float *d_scratch = plan_.scratch_floats ? scratch_dev_.data() : nullptr;
  CUDA_CALL(oc_crop_launch_kernels(plan_, d_packed, d_scratch, stream));
}

}  // namespace objcrop

namespace dali {

DALI_REGISTER_OPERATOR(objcrop__Crop, objcrop::ObjCropCrop<GPUBackend>, GPU);

}  // namespace dali
