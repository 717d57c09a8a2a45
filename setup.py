"""fashion_jax: fashion vision-language pretraining (FashionCLIP, E2, FashionViL, FashionBERT) in JAX.

Install: `pip install -e .[test]` (CPU). `[torch]` adds the CPU build of torch used by the
export/import parity tests; it is pinned because an unpinned torch pulls several GB of CUDA
packages. On GPU/TPU hosts install the matching jax[cuda12] / jax[tpu] wheel first.
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
]

EXTRAS = {
    "torch": ["torch==2.13.0"],
    "test": [
        "torch==2.13.0",
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
}

setup(
    name="fashion_jax",
    version="0.1.0",
    description="Fashion vision-language pretraining in JAX/Flax",
    packages=find_packages(include=["fashion_jax", "fashion_jax.*", "launch", "launch.*", "configs"]),
    package_data={"fashion_jax": ["data/assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
