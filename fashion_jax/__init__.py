"""fashion_jax: fashion vision-language pretraining in JAX/Flax.

Four systems (FashionCLIP, E2, FashionViL, FashionBERT) share one data layer, one model library,
one sharded trainer and one set of evaluators. See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
