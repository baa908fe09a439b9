from setuptools import find_packages, setup

setup(
    name="dali_objcrop",
    version="0.1.0",
    description="Object-aware cropping for self-supervised learning: a DALI loader with BING proposals",
    packages=find_packages(include=["dali_objcrop", "dali_objcrop.*"]),
    package_data={"dali_objcrop": ["models/**/*", "models/*"]},
    include_package_data=True,
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
