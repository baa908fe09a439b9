// crop_check_gpu.cu -- the kernel check's GPU backend: the operator's own kernels and launch code
// (objcrop_crop_launch.h) with the operator's own plan (objcrop_crop_plan.h), on cudaMalloc'd copies.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "crop_check.h"
#include "objcrop_crop_launch.h"

static std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

#define OC_TRY(call, what)                         \
  do {                                             \
    cudaError_t e_ = (call);                       \
    if (e_ != cudaSuccess) {                       \
      err = cuda_error(what, e_);                  \
      goto done;                                   \
    }                                              \
  } while (0)

std::string oc_check_backend_name() {
  int dev = 0;
  cudaDeviceProp prop;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess)
    return "gpu: none";
  return std::string("gpu: ") + prop.name + ", sm_" + std::to_string(prop.major) + std::to_string(prop.minor);
}

std::string oc_check_backend_run(OcCropPlan plan, const std::vector<unsigned char>& images, size_t out_bytes,
                                 std::vector<unsigned char>* out, double* kernel_ms) {
  std::string err;
  unsigned char *d_images = nullptr, *d_out = nullptr;
  void* d_packed = nullptr;
  float* d_scratch = nullptr;
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  float ms = 0.0f;
  *kernel_ms = 0.0;
  OC_TRY(cudaMalloc(&d_images, images.size() + 1), "cudaMalloc images");
  OC_TRY(cudaMalloc(&d_out, out_bytes + 1), "cudaMalloc outputs");
  OC_TRY(cudaMemcpy(d_images, images.data(), images.size(), cudaMemcpyHostToDevice), "copy images");
  OC_TRY(cudaMemset(d_out, 0xff, out_bytes), "memset outputs");  // NaN patterns: an unwritten pixel fails
  for (auto& p : plan.params) {
    p.image += reinterpret_cast<unsigned long long>(d_images);
    p.out += reinterpret_cast<unsigned long long>(d_out);
  }
  err = oc_plan_finish(plan);
  if (!err.empty()) goto done;
  OC_TRY(cudaMalloc(&d_packed, plan.packed.size() * sizeof(unsigned long long)), "cudaMalloc packed");
  OC_TRY(cudaMemcpy(d_packed, plan.packed.data(), plan.packed.size() * sizeof(unsigned long long),
                    cudaMemcpyHostToDevice), "copy packed");
  if (plan.scratch_floats) OC_TRY(cudaMalloc(&d_scratch, plan.scratch_floats * sizeof(float)), "cudaMalloc scratch");
  OC_TRY(cudaEventCreate(&t0), "event");
  OC_TRY(cudaEventCreate(&t1), "event");
  OC_TRY(cudaEventRecord(t0, 0), "event");
  OC_TRY(oc_crop_launch(plan, d_packed, d_scratch, 0), "launch");
  OC_TRY(cudaEventRecord(t1, 0), "event");
  OC_TRY(cudaDeviceSynchronize(), "kernels");
  OC_TRY(cudaEventElapsedTime(&ms, t0, t1), "event");
  *kernel_ms = ms;
  out->resize(out_bytes);
  OC_TRY(cudaMemcpy(out->data(), d_out, out_bytes, cudaMemcpyDeviceToHost), "copy outputs");
done:
  if (t0) cudaEventDestroy(t0);
  if (t1) cudaEventDestroy(t1);
  cudaFree(d_images);
  cudaFree(d_out);
  cudaFree(d_packed);
  cudaFree(d_scratch);
  return err;
}
