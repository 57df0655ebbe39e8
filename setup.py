"""Packaging for sparse-mim: the library (`sparse_mim`), the backbones (`backbones`) and the CLI."""
from setuptools import find_packages, setup

setup(
    name="sparse-mim",
    version="0.1.0",
    description="SparK-style masked image modeling for CNNs with a genuinely sparse encoder",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_mim", "sparse_mim.*", "backbones", "backbones.*"])
    + ["sparse_mim._configs"],
    # the top-level configs/ folder ships inside the package for regular (non-editable) installs
    package_dir={"sparse_mim._configs": "configs"},
    package_data={"sparse_mim._configs": ["*.yaml", "preset/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "torchcodec>=0.16",     # JPEG decoding of data.decode=tensor|gpu (torchvision.io's is deprecated)
        "timm>=1.0",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "tqdm",
        "safetensors",
        "numpy",
        "pillow",
        "matplotlib",
        "tensorboard",
        "scikit-image",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout"],
        # built from source after torch: see README "Optional: MinkowskiEngine backend"
        "minkowski": ["MinkowskiEngine==0.5.4"],
        "detectron2": [],
    },
    entry_points={"console_scripts": ["sparse-mim=sparse_mim.cli:main"]},
)
