r"""Contact sheet of a product dataset (docs/catalog.png): fashion_jax/data/contact_sheet.py.

    python -m experiments.contact_sheet --dataset=synthetic_catalog/smoke --split=train \
        --out=docs/catalog.png

Reads the built dataset when it is prepared in --data_dir (tfds's default when unset); for
synthetic_catalog it otherwise renders the same products straight from the catalog generator
(no build needed). The PNG is palette-quantised to stay small.
"""

from absl import app
from absl import flags
from PIL import Image

from fashion_jax.data import contact_sheet

_DATASET = flags.DEFINE_string("dataset", "synthetic_catalog/smoke", "NAME[/CONFIG].")
_SPLIT = flags.DEFINE_string("split", "train", "Split to show.")
_OUT = flags.DEFINE_string("out", "docs/catalog.png", "Output PNG.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: tfds's default).")
_NUM = flags.DEFINE_integer("num", 24, "Number of products.")
_COLUMNS = flags.DEFINE_integer("columns", 4, "Products per row.")
_DISPLAY = flags.DEFINE_integer("display_size", 128, "Pixel size of the front view on the sheet.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  products = contact_sheet.products_from_dataset(_DATASET.value, _SPLIT.value, _NUM.value,
                                                 _DATA_DIR.value)
  source = "built dataset"
  if products is None:
    products = contact_sheet.products_from_catalog(_DATASET.value, _SPLIT.value, _NUM.value)
    source = "catalog generator (dataset not built)"
  img = contact_sheet.sheet(products, _COLUMNS.value, _DISPLAY.value)
  img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(_OUT.value, optimize=True)
  print(f"wrote {_OUT.value}: {len(products)} products of {_DATASET.value}:{_SPLIT.value} from "
        f"the {source}")


if __name__ == "__main__":
  app.run(main)
