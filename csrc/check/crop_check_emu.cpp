// crop_check_emu.cpp -- the kernel check's CPU backend: the same plan, the kernels emulated serially
// (crop_emulate.cpp), for machines without a GPU.
#include <cstring>

#include "crop_check.h"

std::string oc_check_backend_name() { return "emulated on the CPU"; }

std::string oc_check_backend_run(OcCropPlan plan, const std::vector<unsigned char>& images, size_t out_bytes,
                                 std::vector<unsigned char>* out, double* kernel_ms) {
  *kernel_ms = 0.0;
  out->assign(out_bytes, 0xff);
  for (auto& p : plan.params) {
    p.image += reinterpret_cast<unsigned long long>(images.data());
    p.out += reinterpret_cast<unsigned long long>(out->data());
  }
  std::string err = oc_plan_finish(plan);
  if (!err.empty()) return err;
  std::vector<float> scratch(plan.scratch_floats + 1);
  oc_emulate_launch(plan, scratch.data());
  return "";
}
