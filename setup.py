"""Packaging is declared in pyproject.toml; this file only adds the build step that ships the C++/CUDA sources."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """Also ship csrc/ (CUDA sources compiled at run time by cupy.RawModule) as dali_objcrop/kernels/csrc,
    and csrc/dali/ (the DALI operators, compiled on first use by dali_objcrop.plugin.build) beside it.
    csrc/check/ (the standalone kernel check and the emulator the tests use) stays out of the wheel."""

    def run(self):
        super().run()
        src = Path(__file__).resolve().parent / "csrc"
        for sub in ("", "dali"):
            dst = Path(self.build_lib) / "dali_objcrop" / "kernels" / "csrc" / sub
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / sub).glob("*")):
                if f.is_file() and f.suffix in (".cu", ".h", ".cpp", ".cc"):
                    shutil.copy2(f, dst / f.name)


setup(cmdclass={"build_py": BuildPyWithKernels})
