"""Compile the DALI operators of ``csrc/dali/`` into one shared library, cached.

Every ``csrc/dali/*.cc`` is compiled with the C++ compiler (``$CXX`` or g++)
and, where CUDA's compiler is found (``$NVCC``, ``$CUDA_HOME/bin/nvcc`` or
``nvcc`` on the PATH), the CUDA part too: ``*_gpu.cc`` (the GPU operator's host
code, g++) and ``*.cu`` (the kernels alone, no DALI header, nvcc for every
architecture the installed CUDA supports from Turing, sm_75, up, plus PTX of the
newest so later GPUs JIT it; ``$DALI_OBJCROP_CUDA_ARCHS=90`` or ``75,90``
narrows the list), against the installed DALI's headers and ``libdali``
(``nvidia.dali.sysconfig`` flags).  Files compile in parallel.
The result lives in::

    $DALI_OBJCROP_HOME/plugin/<dali version>-<sha>/libdali_objcrop_ops.so

(default home ``~/.cache/dali_objcrop``), where ``sha`` hashes the sources
(``csrc/dali/*`` and ``csrc/*.h``), the flags, the compilers' paths and their
versions, so an edited source, another DALI release or another toolchain (also
one upgraded in place) builds a fresh library and
never loads a stale one: DALI does not promise a stable C++ ABI across
releases (setup.py pins the range this is built and tested against).

DALI's headers include CUDA's runtime headers even for a CPU operator, so a
CUDA include folder with ``cuda_runtime.h`` and ``crt/host_config.h`` is needed
(``$CUDA_HOME``/``$CUDA_PATH``, ``/usr/local/cuda``, ``/usr/include``, ...;
``$DALI_OBJCROP_CUDA_INCLUDE`` overrides the search).

A build costs ~10 s per operator file on one core (the DALI headers are
heavy); it happens once per (DALI version, sources, flags), under a file lock
so that parallel processes (DDP ranks, test workers) build it only once.
"""
from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LIB_NAME = "libdali_objcrop_ops.so"
CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-w")
# -ffp-contract=off: no FMA contraction, so the window arithmetic rounds as NumPy does.
# -fmad=false: the kernels round as the CPU operator does (the kernel check finds them bit-identical)
NVCC_FLAGS = ("-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC", "-fmad=false", "-w")
MIN_CUDA_ARCH = 75   # Turing: the oldest architecture CUDA 13 still builds for


class PluginBuildError(RuntimeError):
    """The operators could not be built (no compiler, no headers, or a compile error; the message says)."""


def dali_version() -> str:
    """The installed DALI's version string (``nvidia.dali.__version__``)."""
    import nvidia.dali
    return nvidia.dali.__version__


def home() -> Path:
    """The package's cache folder (:func:`dali_objcrop.fileio.cache_home`)."""
    from ..fileio import cache_home
    return cache_home()


def sources_dir() -> Path:
    """The folder of the operator sources: ``<csrc>/dali`` (checkout or the installed package's copy)."""
    from ..kernels.common import csrc_dir
    d = csrc_dir() / "dali"
    if not d.is_dir():
        raise PluginBuildError(f"operator sources not found in {d}; reinstall dali_objcrop")
    return d


def cxx() -> str | None:
    """The C++ compiler: ``$CXX`` or g++ (None if not found)."""
    return shutil.which(os.environ.get("CXX", "g++"))


def nvcc() -> str | None:
    """CUDA's compiler: ``$NVCC``, ``$CUDA_HOME/bin/nvcc`` or ``nvcc`` on the PATH (None if not found)."""
    if os.environ.get("NVCC"):
        return shutil.which(os.environ["NVCC"])
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _tool_version(path: str) -> str:
    """The last line of ``path --version`` (nvcc: the release and build; g++: the first line), cached."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    lines = out.splitlines()
    return (lines[-1] if "nvcc" in Path(path).name else lines[0]) if lines else "unknown"


def cuda_archs(nvcc_path: str | None = None) -> list[int]:
    """The architectures the CUDA build targets: ``$DALI_OBJCROP_CUDA_ARCHS`` (e.g. ``90`` or ``75,90``),
    else every real one ``nvcc --list-gpu-code`` names from sm_75 up (no ``a``/``f`` variants)."""
    env = os.environ.get("DALI_OBJCROP_CUDA_ARCHS", "").strip()
    if env:
        try:
            archs = sorted({int(a.strip().removeprefix("sm_")) for a in env.split(",") if a.strip()})
        except ValueError:
            raise PluginBuildError(f"DALI_OBJCROP_CUDA_ARCHS={env!r}: give numbers such as 90 or 75,90") from None
        return archs
    return list(_listed_archs(nvcc_path or nvcc()))


@functools.lru_cache(maxsize=None)
def _listed_archs(nvcc_path: str | None) -> tuple[int, ...]:
    """``nvcc --list-gpu-code``'s real architectures from sm_75 up, asked once per nvcc."""
    try:
        out = subprocess.run([nvcc_path, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        out = ""
    archs = sorted({int(m) for m in re.findall(r"^sm_(\d+)$", out, re.M) if int(m) >= MIN_CUDA_ARCH})
    return tuple(archs) or (80, 90)   # an nvcc too old to list its targets


def gencode_flags(archs: list[int]) -> list[str]:
    """nvcc ``-gencode`` flags: machine code for each architecture, PTX of the newest (JIT on later GPUs)."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + \
        [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _complete(include: Path) -> bool:
    return (include / "cuda_runtime.h").is_file() and (include / "crt" / "host_config.h").is_file()


def cuda_include_dir() -> Path | None:
    """A CUDA include folder complete enough for DALI's headers, or None.

    Searched: ``$DALI_OBJCROP_CUDA_INCLUDE``, ``$CUDA_HOME``/``$CUDA_PATH``, the folder of the nvcc
    found, ``/usr/local/cuda``, ``/usr/local/cuda-*``, ``/opt/cuda``, ``/usr/include``, and the pip
    wheels' ``nvidia/*/include`` (only where they hold ``crt/host_config.h`` too).
    """
    cands: list[Path] = []
    if os.environ.get("DALI_OBJCROP_CUDA_INCLUDE"):
        return Path(os.environ["DALI_OBJCROP_CUDA_INCLUDE"])
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root:
            cands.append(Path(root) / "include")
    n = nvcc()
    if n:
        cands.append(Path(n).resolve().parents[1] / "include")
    cands += [Path("/usr/local/cuda/include")] + [Path(p) / "include" for p in sorted(glob.glob("/usr/local/cuda-*"),
                                                                                      reverse=True)]
    cands += [Path("/opt/cuda/include"), Path("/usr/include")]
    for sp in sys.path:
        cands += sorted(Path(sp).glob("nvidia/*/include")) if sp and Path(sp, "nvidia").is_dir() else []
    return next((c for c in cands if _complete(c)), None)


def _dali_flags() -> tuple[list[str], list[str]]:
    import nvidia.dali.sysconfig as sc
    return list(sc.get_compile_flags()), list(sc.get_link_flags())


def build_key(cuda: bool, sources: Path | None = None) -> tuple[str, list[Path]]:
    """``(<dali version>-<sha16>, source files)`` of a build: the cache folder's name and what is compiled."""
    src = sources or sources_dir()
    # *_gpu.cc: the GPU operator's host code, which calls the kernels of *.cu: part of the CUDA build only
    files = sorted(f for f in src.glob("*.cc") if cuda or not f.name.endswith("_gpu.cc"))
    files += sorted(src.glob("*.cu")) if cuda else []
    headers = sorted(src.glob("*.h")) + sorted(src.parent.glob("*.h"))
    h = hashlib.sha256()
    cflags, lflags = _dali_flags()
    compilers = [cxx() or "", (nvcc() or "") if cuda else ""]
    versions = [_tool_version(c) for c in compilers if c]
    nvcc_flags = [*NVCC_FLAGS, *gencode_flags(cuda_archs())] if cuda else []
    for part in [*CXX_FLAGS, *nvcc_flags, *cflags, *lflags, *compilers, *versions, str(cuda)]:
        h.update(part.encode() + b"\0")
    for f in files + headers:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return f"{dali_version()}-{h.hexdigest()[:16]}", files


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        raise PluginBuildError(f"{what} failed ({' '.join(cmd[:1])} exit {res.returncode}):\n"
                               f"{msg[-4000:]}\ncommand: {' '.join(cmd)}")


def library_path(cuda: bool | None = None, sources: Path | None = None, verbose: bool = False) -> Path:
    """Compile (or find cached) the operators' shared library and return its path.

    Args:
        cuda: also compile ``*.cu`` with nvcc; None: where nvcc is found.
        sources: the operator sources (default: :func:`sources_dir`).
        verbose: print the compile commands to stderr.

    Raises:
        PluginBuildError: no C++ compiler (or, with ``cuda=True``, no nvcc), no CUDA headers, or a
            compile/link error (with the compiler's message).
    """
    if sources is None and cuda is False:
        # a CUDA build already loaded in this process holds the CPU operators too: loading a second
        # library that registers the same schemas would clash
        loaded = sys.modules.get("dali_objcrop.plugin")
        path = getattr(loaded, "_state", {}).get("path") if loaded else None
        if path is not None and Path(path).is_file():
            return Path(path)
    compiler = cxx()
    if compiler is None:
        raise PluginBuildError(f"no C++ compiler found (CXX={os.environ.get('CXX', 'g++')!r})")
    if cuda is None:  # CUDA operators where nvcc is found and there are any
        cuda = nvcc() is not None and any((sources or sources_dir()).glob("*.cu"))
    if cuda and nvcc() is None:
        raise PluginBuildError("cuda=True but nvcc was not found (set $NVCC or $CUDA_HOME)")
    key, files = build_key(cuda, sources)
    out_dir = home() / "plugin" / key
    lib = out_dir / LIB_NAME
    if cached_library_ok(lib):
        return lib
    if not any(f.suffix == ".cc" for f in files):
        raise PluginBuildError(f"no operator sources (*.cc) in {sources or sources_dir()}")
    inc = cuda_include_dir()
    if inc is None:
        raise PluginBuildError("CUDA headers not found (DALI's headers need cuda_runtime.h and crt/host_config.h); "
                               "install the CUDA toolkit headers or set $CUDA_HOME / $DALI_OBJCROP_CUDA_INCLUDE")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one build; the others wait and reuse it
        if cached_library_ok(lib):
            return lib
        discard_cached_library(lib)               # damaged, truncated or unrecorded: rebuilt below
        cflags, lflags = _dali_flags()
        nvcc_flags = [*NVCC_FLAGS, *gencode_flags(cuda_archs())] if cuda else []
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            cmds = []
            for f in files:
                obj = Path(tmp) / (f.name + ".o")
                if f.suffix == ".cu":
                    cmd = [nvcc(), *nvcc_flags, *cflags, f"-I{inc}", "-c", str(f), "-o", str(obj)]
                else:
                    cmd = [compiler, *CXX_FLAGS, *cflags, f"-I{inc}", "-c", str(f), "-o", str(obj)]
                if verbose:
                    print(" ".join(cmd), file=sys.stderr)
                cmds.append((cmd, f"compiling {f.name}", str(obj)))
            # the files are independent: one compiler per core (each takes ~10 s of DALI headers)
            with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
                for fut in [pool.submit(_run, cmd, what) for cmd, what, _ in cmds]:
                    fut.result()
            objs = [obj for _, _, obj in cmds]
            link = [compiler, "-shared", "-o", str(Path(tmp) / LIB_NAME), *objs, *lflags]
            if cuda:  # the kernels' launches need CUDA's runtime: its static library, beside the headers
                root = inc.resolve().parent
                libdir = next((d for d in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib")
                               if (d / "libcudart_static.a").is_file()), root / "lib64")
                link += [f"-L{libdir}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
            _run(link, "linking the operators")
            os.replace(Path(tmp) / LIB_NAME, lib)
            _record_library(lib)                  # last: a library without its record is rebuilt
    return lib


# ---- the cache's integrity record -------------------------------------------------------------------------------
# Beside each cached library: ``<lib>.sha256.json`` with its size and sha256, written atomically after
# the library.  A library is used only when it matches its record; a truncated or damaged one (a full
# disk, a copy cut short, a crash during a write) would otherwise be mapped by ``load_library`` and kill
# the process with SIGBUS.
RECORD_SUFFIX = ".sha256.json"


def _record_path(lib: Path) -> Path:
    return lib.with_name(lib.name + RECORD_SUFFIX)


def _file_sha256(path: Path) -> str:
    from ..fileio import sha256_file
    return sha256_file(path)


def _record_library(lib: Path) -> None:
    from ..fileio import atomic_write_json
    atomic_write_json(_record_path(lib), {"size": lib.stat().st_size, "sha256": _file_sha256(lib)})


def cached_library_ok(lib: str | os.PathLike) -> bool:
    """Whether a cached library exists and matches its record (size and sha256)."""
    lib = Path(lib)
    try:
        rec = json.loads(_record_path(lib).read_text())
        return (isinstance(rec, dict) and rec.get("size") == lib.stat().st_size
                and rec.get("sha256") == _file_sha256(lib))
    except (OSError, ValueError):
        return False


def discard_cached_library(lib: str | os.PathLike) -> None:
    """Remove a cached library and its record (the next :func:`library_path` builds it again)."""
    lib = Path(lib)
    for p in (_record_path(lib), lib):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m dali_objcrop.plugin.build [--cpu]``: build now and print the library's path."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="only the CPU operators (skip nvcc)")
    ap.add_argument("--cuda", action="store_true", help="require the CUDA operators (nvcc)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    try:
        print(library_path(cuda=False if a.cpu else (True if a.cuda else None), verbose=a.verbose))
    except PluginBuildError as e:
        print(f"dali_objcrop: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
