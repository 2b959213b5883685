from setuptools import setup

setup(
    name="fastprefix",
    version="0.1.0",
    description="Attention with a shared or learned prefix, without materializing the prefix (Triton + PyTorch).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastprefix", "fastprefix.models", "fastprefix.kernels"],
    install_requires=[
        "torch>=2.4",
        "triton>=3.4; platform_system == 'Linux'",  # triton.knobs
        "transformers>=5.20",
        "safetensors",  # Prefix.save, TrainablePrefix.save_pretrained
        "tqdm",  # the CLI's progress bars
    ],
    extras_require={
        "bench": ["peft>=0.21", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "peft>=0.21", "accelerate", "matplotlib", "gguf"],  # accelerate: Trainer
    },
    entry_points={"console_scripts": ["fastprefix=fastprefix.cli:main"]},
)
