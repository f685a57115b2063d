"""ASO-SE: a compiled training engine for differentiable neural architecture search."""
from setuptools import setup

EXPORT = ["onnx", "onnxscript", "onnxruntime"]   # aso-se export --format onnx (TorchScript needs only torch)
TENSORBOARD = ["tensorboard"]                     # --tensorboard

setup(
    name="aso-se",
    version="0.1.0",
    description="Compiled training engine for DARTS-style architecture search (warmup, search, growth, optimize)",
    packages=["kernels", "engine"],
    python_requires=">=3.10",
    # torch/torchvision are pinned by the Makefile bootstrap (torch==2.14.1, torchvision==0.29.1);
    # here they are ranges so the package also installs next to an existing torch.
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "triton",
        "nvidia-dali-cuda120",
        "numpy",
        "nvtx",
        "tqdm",
        "matplotlib",        # aso-se report
    ],
    extras_require={
        "export": EXPORT,
        "tensorboard": TENSORBOARD,
        # the suite checks the export round trips and the scalars; make test runs one pytest-xdist worker per core
        "test": ["pytest", "pytest-xdist", *EXPORT, *TENSORBOARD],
    },
    entry_points={"console_scripts": ["aso-se = engine.cli:main"]},
)
