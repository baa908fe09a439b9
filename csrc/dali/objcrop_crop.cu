// objcrop_crop.cu -- GPU backend of objcrop__Crop (fn.objcrop.crop); the schema is in objcrop_crop.cc.
//
// Per batch: the per-view parameter blocks (built on the host in SetupImpl from the CPU inputs
// windows / flip / aug), the Gaussian taps, the list of blurred views and the normalisation go to the
// device in one copy through DALI's scratchpad; the blur's intermediate buffer (S x S x 3 float per
// blurred view) comes from the same scratchpad (stream-ordered, freed after the launches); then the two
// kernels of objcrop_crop_kernels.h run on ws.stream() for the whole batch.
#include <vector>

#include "dali/core/cuda_error.h"
#include "dali/kernels/dynamic_scratchpad.h"
#include "objcrop_crop.h"
#include "objcrop_crop_kernels.h"

namespace objcrop {

template <>
void ObjCropCrop<dali::GPUBackend>::RunImpl(dali::Workspace &ws) {
  const auto &images = ws.Input<dali::GPUBackend>(0);
  auto &out0 = ws.Output<dali::GPUBackend>(0);
  auto &out1 = ws.Output<dali::GPUBackend>(1);
  out0.SetLayout("CHW");
  out1.SetLayout("CHW");
  const int n = images.num_samples();
  if (n == 0) return;
  DALI_ENFORCE(n <= 65535, dali::make_string("objcrop.crop (GPU): at most 65535 samples per batch, got ", n));
  DALI_ENFORCE(size_ <= 4096, dali::make_string("objcrop.crop (GPU): size must be <= 4096, got ", size_));
  const int S = size_;
  cudaStream_t stream = ws.stream();
  std::vector<int> blurred;
  for (int i = 0; i < n; ++i) {
    for (int v = 0; v < 2; ++v) {
      OcViewParams &p = params_[2 * i + v];
      p.image = reinterpret_cast<unsigned long long>(images.raw_tensor(i));
      p.out = reinterpret_cast<unsigned long long>((v == 0 ? out0 : out1).raw_mutable_tensor(i));
      p.scratch = -1;
      if (p.blur_size) {
        p.scratch = static_cast<int>(blurred.size());
        blurred.push_back(2 * i + v);
      }
    }
  }
  const int num_blurred = static_cast<int>(blurred.size());
  std::vector<float> taps = taps_;
  if (taps.empty()) taps.push_back(0.0f);        // no empty collections in the copy
  if (blurred.empty()) blurred.push_back(0);
  std::vector<float> norm(norm_, norm_ + 6);
  dali::kernels::DynamicScratchpad scratchpad(dali::AccessOrder{stream});
  auto dev = scratchpad.ToContiguousGPU(stream, params_, taps, blurred, norm);
  const OcViewParams *d_params = std::get<0>(dev);
  const float *d_taps = std::get<1>(dev);
  const int *d_blurred = std::get<2>(dev);
  const float *d_norm = std::get<3>(dev);
  float *d_buf = num_blurred
      ? scratchpad.AllocateGPU<float>(static_cast<size_t>(num_blurred) * S * S * 3, 256)
      : nullptr;
  dim3 rows_grid(S, 2, n);
  size_t smem = sizeof(float) * 3 * S;
  oc_crop_rows_kernel<<<rows_grid, OC_ROW_THREADS, smem, stream>>>(d_params, d_taps, d_norm, S, out_kind_, d_buf);
  CUDA_CALL(cudaGetLastError());
  if (num_blurred) {
    const long long blocks = static_cast<long long>(num_blurred) * ((S * S + OC_COL_THREADS - 1) / OC_COL_THREADS);
    DALI_ENFORCE(blocks < (1LL << 31), "objcrop.crop (GPU): batch too large for one blur launch");
    dim3 cols_grid(static_cast<unsigned>(blocks));
    oc_blur_cols_kernel<<<cols_grid, OC_COL_THREADS, 0, stream>>>(d_params, d_blurred, d_taps, d_norm, S,
                                                                  out_kind_, d_buf);
    CUDA_CALL(cudaGetLastError());
  }
}

}  // namespace objcrop

namespace dali {

DALI_REGISTER_OPERATOR(objcrop__Crop, objcrop::ObjCropCrop<GPUBackend>, GPU);

}  // namespace dali
