"""Packaging for sparse-mim: the library (`sparse_mim`), the backbones (`backbones`) and the CLI."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sparse-mim",
    version="0.1.0",
    description="SparK-style masked image modeling for CNNs with a genuinely sparse encoder",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    project_urls={
        "SparK paper": "https://arxiv.org/abs/2301.03580",
        "ConvNeXt V2 paper": "https://arxiv.org/abs/2301.00808",
    },
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
        "dev": ["pytest>=7", "pytest-timeout", "import-linter>=2.17"],  # lint-imports: the contracts in .importlinter
        # the documentation site: mkdocs build --strict (see mkdocs.yml)
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26", "mkdocstrings-python>=1.12"],
        # built from source after torch: see docs/minkowski.md
        "minkowski": ["MinkowskiEngine==0.5.4"],
        "detectron2": [],
    },
    entry_points={"console_scripts": ["sparse-mim=sparse_mim.cli:main"]},
)
