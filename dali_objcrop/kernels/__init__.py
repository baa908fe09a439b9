"""The fused crop kernel (``csrc/``) and its references.

* :mod:`.common`: where the CUDA sources are, the source string NVRTC compiles,
  the float64 parameter block shared by the kernel and the CPU builds.
* :mod:`.reference`: a vectorised NumPy reference of the kernel's resampling.
* :mod:`.host`: for CPU tests, the kernel body compiled with g++ (``objcrop_host.cpp``)
  and the CUDA kernels themselves run serially (``objcrop_emulate.cpp``), through ctypes.
* :mod:`.cupy_backend`: the kernel on the GPU through ``cupy.RawModule``
  (imports CuPy lazily; nothing here needs a GPU to be imported).
"""
