"""The fused crop kernel (``csrc/``) and its references.

* :mod:`.common`: where the CUDA sources are, the source string NVRTC compiles,
  the float64 parameter block shared by the kernel and the CPU builds.
* :mod:`.reference`: a vectorised NumPy reference of the kernel's resampling.
* :mod:`.cupy_backend`: the kernel on the GPU through ``cupy.RawModule``
  (imports CuPy lazily; nothing here needs a GPU to be imported).

The CPU test harness (the kernel body built with g++ and the CUDA kernels run
serially) is test code: ``tests/helpers/kernel_host.py`` and ``tests/helpers/csrc/``.
"""
