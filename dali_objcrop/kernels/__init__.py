"""The fused crop kernel (``csrc/``) and its references.

* :mod:`.common`: where the CUDA sources are, the source string NVRTC compiles,
  the float64 parameter block shared by the kernel and the CPU build.
* :mod:`.reference`: a vectorised NumPy reference of the kernel's resampling.
* :mod:`.host`: the kernel body compiled with g++ for CPU tests (ctypes).
* :mod:`.cupy_backend`: the kernel on the GPU through ``cupy.RawModule``
  (imports CuPy lazily; nothing here needs a GPU to be imported).
"""
