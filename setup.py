from setuptools import find_packages, setup

# The cluster installs keep their own torch build: ranges here, exact pins only in the `dev` extra,
# which is what CI and the developer machines install (see README).
setup(
    name="cosmos_fast",
    version="0.1.0",
    description="Fast, faithful COSMOS (CVPR 2025) trainer: fused Triton kernels, DALI, DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cosmos_fast", "cosmos_fast.*"]) + ["cosmos_fast.kernels"],
    # kernels/ ships as cosmos_fast.kernels so it cannot clash with the unrelated PyPI `kernels`
    package_dir={"cosmos_fast": "cosmos_fast", "cosmos_fast.kernels": "kernels"},
    package_data={"cosmos_fast": ["configs/*.yaml", "eval/seg_classes/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "open_clip_torch>=3",
        "webdataset>=1",
        "deepspeed",
        "huggingface_hub",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # versions known to install and work on the CPU build machines and CI
        "dev": [
            "pytest>=8",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "open_clip_torch==3.3.0",
            "webdataset==1.0.2",
            "deepspeed==0.19.8",
            "nvidia-dali-cuda130==2.4.0",
            "numba==0.68.1",          # DALI CPU pipeline: the fused kernel equal to torchvision's crops (optional elsewhere)
            "matplotlib==3.11.2",     # bench_results/ PNGs are compared byte for byte (tests/test_benchmarks.py)
            "pillow==13.0.0",         # writes those PNGs; the crop kernel follows Pillow 13's resampling order
            "torchmetrics==1.9.0",    # tests/test_segmentation.py: mIoU against its multiclass Jaccard index
        ],
        # DALI for the cluster's CUDA major (A100 clusters: CUDA 12)
        "dali": ["nvidia-dali-cuda120", "numba"],
        # flash-attn and NVIDIA apex are cluster builds (exact torch pins; see README)
        "gpu": ["triton", "xformers"],
    },
    entry_points={"console_scripts": ["cosmos-fast=cosmos_fast.cli:main"]},
)
