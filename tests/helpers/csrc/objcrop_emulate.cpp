// objcrop_emulate.cpp -- run the CUDA kernels of objcrop_kernel.cu on the CPU, serially.
//
// For tests without a GPU: the CUDA keywords become plain C++, blockIdx / threadIdx become
// globals, and the launchers below walk the grid block by block and, inside a block, thread by
// thread in order 0, 1, ...  That is a valid schedule for these kernels: their only barrier
// follows thread 0's write of the block's shared window, and no thread reads another's output.
// So the kernels' own index arithmetic (grid mapping, pixels per thread, NCHW / HWC offsets,
// the fp16 / bf16 stores) is exercised exactly as written, with the host maths of the core.
#include <algorithm>

struct OcDim3 {
  unsigned int x, y, z;
};
static OcDim3 blockIdx, threadIdx, blockDim, gridDim;
using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)
#define __syncthreads() ((void)0)

#include "objcrop_kernel.cu"

#define OC_EMU_GRID(body)                                                              \
  blockDim = {(unsigned)bx, 1, 1};                                                     \
  gridDim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};                                \
  for (unsigned z = 0; z < gridDim.z; ++z)                                             \
    for (unsigned y = 0; y < gridDim.y; ++y)                                           \
      for (unsigned x = 0; x < gridDim.x; ++x) {                                       \
        blockIdx = {x, y, z};                                                          \
        for (unsigned t = 0; t < blockDim.x; ++t) {                                    \
          threadIdx = {t, 0, 0};                                                       \
          body;                                                                        \
        }                                                                              \
      }

extern "C" {

void oc_emu_windows(int gx, int bx, const int* sizes, const float* boxes, const long long* offsets,
                    const long long* index, int n, unsigned long long seed, unsigned long long epoch,
                    const double* params, int* windows, int* regions, unsigned char* flips, int* box_index,
                    unsigned char* fallback, int* shift) {
  const int gy = 1, gz = 1;
  OC_EMU_GRID(objcrop_windows(sizes, boxes, offsets, index, n, seed, epoch, params, windows, regions, flips,
                              box_index, fallback, shift))
}

// kind: 0 float32, 1 float16 bits, 2 bfloat16 bits (out0/out1 sized accordingly)
void oc_emu_crop(int kind, int gx, int gy, int gz, int bx, const unsigned long long* ptrs, const int* sizes,
                 const float* boxes, const long long* offsets, const long long* index, unsigned long long seed,
                 unsigned long long epoch, const double* params, const float* norm, int out_size, void* out0,
                 void* out1, int* windows, unsigned char* flips) {
  if (kind == 0) {
    OC_EMU_GRID(objcrop_crop_f32(ptrs, sizes, boxes, offsets, index, seed, epoch, params, norm, out_size,
                                 (float*)out0, (float*)out1, windows, flips))
  } else if (kind == 1) {
    OC_EMU_GRID(objcrop_crop_f16(ptrs, sizes, boxes, offsets, index, seed, epoch, params, norm, out_size,
                                 (unsigned short*)out0, (unsigned short*)out1, windows, flips))
  } else {
    OC_EMU_GRID(objcrop_crop_bf16(ptrs, sizes, boxes, offsets, index, seed, epoch, params, norm, out_size,
                                  (unsigned short*)out0, (unsigned short*)out1, windows, flips))
  }
}

// kind: 0 uint8, 1 float32
void oc_emu_apply(int kind, int gx, int gy, int gz, int bx, const unsigned long long* ptrs, const int* sizes,
                  const int* windows, const unsigned char* flips, int out_size, void* out0, void* out1) {
  if (kind == 0) {
    OC_EMU_GRID(objcrop_apply_u8(ptrs, sizes, windows, flips, out_size, (unsigned char*)out0,
                                 (unsigned char*)out1))
  } else {
    OC_EMU_GRID(objcrop_apply_f32(ptrs, sizes, windows, flips, out_size, (float*)out0, (float*)out1))
  }
}

}  // extern "C"
