import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """Also ship csrc/ (CUDA sources compiled at run time by cupy.RawModule) as dali_objcrop/kernels/csrc."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "dali_objcrop" / "kernels" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(__file__).resolve().parent / "csrc").glob("*")):
            if f.suffix in (".cu", ".h", ".cpp"):
                shutil.copy2(f, dst / f.name)


setup(
    name="dali_objcrop",
    version="0.1.0",
    description="Object-aware cropping for self-supervised learning: a DALI loader with BING proposals",
    # dali_objcrop/train is a link to the top-level train/ (the trainer's home in the repository): installed
    # code as dali_objcrop.train, importable from a checkout on PYTHONPATH too, no top-level "train" package
    packages=find_packages(include=["dali_objcrop", "dali_objcrop.*"]),
    package_data={"dali_objcrop": ["models/**/*", "models/*"]},
    include_package_data=True,
    cmdclass={"build_py": BuildPyWithKernels},
    python_requires=">=3.10",
    install_requires=[
        "nvidia-dali-cuda120>=2.0",
        "torch>=2.4",
        "torchvision>=0.19",
        "opencv-contrib-python-headless>=4.8",
        "numpy>=1.24",
        # BING training (liblinear SVMs) -- see the proposals issue
        "scikit-learn>=1.3",
        # progress bars with rate and ETA for long jobs
        "tqdm>=4.60",
        # throughput plots and crop grids' figures
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["cupy-cuda12x>=13"],
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["dali-objcrop=dali_objcrop.cli:main"]},
)
