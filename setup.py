"""fashion_jax: fashion vision-language pretraining (FashionCLIP, E2, FashionViL, FashionBERT) in JAX.

Install: `pip install -e .[test]` (CPU). `[torch]` adds the CPU build of torch used by the
export/import parity tests; it is pinned because an unpinned torch pulls several GB of CUDA
packages. `[search]` FAISS, `[serve]` the search service, `[onnx]` ONNX export and onnxruntime,
`[siglip]` SigLIP's SentencePiece tokenizer. On GPU/TPU hosts install the matching jax[cuda12] / jax[tpu] wheel first.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorboard==2.21.0",
    "importlib_resources==7.1.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "h5py==3.14.0",
    "scikit-learn==1.9.1",
    "matplotlib==3.11.2",
    "ftfy==6.3.1",  # open_clip's text cleaning (interop/open_clip.py), as open_clip does it.
]

SERVE = ["fastapi==0.165.0", "uvicorn==0.55.0", "python-multipart==0.0.34"]
SEARCH = ["faiss-cpu==1.15.1"]
ONNX = ["onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2"]
SIGLIP = ["sentencepiece==0.2.2"]  # SiglipTokenizer (spiece.model).

EXTRAS = {
    "torch": ["torch==2.13.0"],
    "search": SEARCH,
    "serve": SERVE + SEARCH,
    "onnx": ["torch==2.13.0"] + ONNX,
    "siglip": SIGLIP,
    # open-clip-torch and timm (the open_clip parity tests' references) are NOT here: both
    # require torchvision, whose wheels on the index are CUDA builds that pull a CUDA torch (or,
    # pinned, fail to load beside the CPU torch). README's test command installs them with
    # --no-deps; tests/torchvision_cpu.py explains the rest.
    "test": ["torch==2.13.0", "pytest==9.2.0", "pytest-xdist==3.8.0", "nbclient==0.11.0",
             "nbformat==5.11.1", "ipykernel==7.4.0", "httpx==0.29.0", "selenium==4.51.0",
             "psutil==7.2.2"] + SERVE + SEARCH + ONNX + SIGLIP,
}

setup(
    name="fashion_jax",
    version="0.1.0",
    description="Fashion vision-language pretraining in JAX/Flax",
    packages=find_packages(include=["fashion_jax", "fashion_jax.*", "launch", "launch.*", "configs"]),
    package_data={"fashion_jax": ["data/assets/**/*", "serve/static/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
