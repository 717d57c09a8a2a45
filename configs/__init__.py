"""The ml_collections configs of every system (`get_config(arg)` in each module).

A package so that `pip install` ships them next to `fashion_jax` and `launch` (site-packages/
configs): notebooks and fashion_jax/prepare/ find them beside the installed package
exactly as in a checkout. Command lines name them by path: `--config=configs/fashionclip.py:smoke`.
"""
