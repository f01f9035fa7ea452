from setuptools import find_packages, setup

setup(
    name="lingua",
    version="0.1.0",
    description="A small, fast, hackable LLM pre-training framework whose runs survive anything.",
    packages=find_packages(include=["lingua", "lingua.*", "apps", "apps.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, not a pin: GPU users bring their own CUDA build. Install torch first on CPU machines
        # (`pip install torch==2.13.0`), otherwise pip pulls a multi-GB CUDA build.
        "torch>=2.6,<2.15",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "psutil",
        "zlib-ng",  # crc32 of checkpoints and data files, ~7x zlib's speed (same values; zlib if it is missing)
    ],
    extras_require={
        "gpu": ["xformers"],
        "tokenizers": ["sentencepiece", "tiktoken"],
        "wandb": ["wandb"],
        "eval": ["lm-eval"],
        "data": ["pyarrow"],
        "hf": ["transformers", "safetensors", "tokenizers", "protobuf"],
        "plot": ["matplotlib"],
        "dev": ["pytest", "pytest-xdist", "hypothesis", "sentencepiece", "tiktoken", "pyarrow", "wandb", "lm-eval",
                "psutil", "ruff", "transformers", "safetensors", "tokenizers", "protobuf", "matplotlib"],
    },
)
