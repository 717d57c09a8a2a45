"""Derived artefacts of a run, made before training by ONE command, and drivers of the trainer.

  python -m launch.prepare --config=configs/fashionvil.py:smoke --workdir=runs/fashionvil_smoke
  python -m launch.train   --config=configs/fashionvil.py:smoke --workdir=runs/fashionvil_smoke

manifest.py   which artefacts a config needs, <workdir>/prepared/manifest.json, and `apply`,
              which fills the config keys from it (launch.train, launch.evaluate)
make.py       makes every needed artefact (launch.prepare's library)
attributes.py FashionViL's pseudo-attribute vocabulary (PAC), mined from the train split
vq_codes.py   FashionViL's MPFC targets: trains the VQ tokenizer, caches its codes
patches.py    FashionBERT's frozen patch features (opt-in: data.patch_features='prepared')
downstream.py FashionViL's downstream fine-tunes from a pretrained run, one row of metrics

Layering: this package sits above the trainer (it runs train/loop.py) and the systems and
evaluators; nothing below imports it.
"""
