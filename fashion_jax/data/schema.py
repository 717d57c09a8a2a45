"""The product schema every product-style dataset in fashion_jax follows.

One TFDS example is one PRODUCT (not one image): FashionGen groups its pose rows by product id,
the synthetic catalog renders 2-4 views per product, a user's catalog lists one or more image
paths per row. The input pipeline reads only these fields, so any builder that emits them feeds
every system unchanged.

Fields (TFDS feature -> meaning):
  product_id   Text                 unique id within the dataset ("p000123", FashionGen productID)
  images       Sequence(Image(shape=(None, None, 3), encoding_format='jpeg'))  1+ views, uint8 RGB
  title        Text                 short name ("navy striped cotton shirt")
  description  Text                 free text; may leave attributes unsaid
  category     Text                 coarse category ("tops"), '' when unknown
  subcategory  Text                 fine category ("shirts"), '' when unknown
  brand        Text                 '' when unknown
  season       Text                 e.g. "SS2016", '' when unknown
  composition  Text                 e.g. "100% cotton", '' when unknown
  gender       Text                 "men" | "women" | "unisex" | ''

Builders may add fields (the synthetic catalog adds its ground-truth attributes, a user's catalog
adds one Text field per extra CSV column); pipelines ignore what they do not ask for.
"""

TEXT_FIELDS = (
    "product_id",
    "title",
    "description",
    "category",
    "subcategory",
    "brand",
    "season",
    "composition",
    "gender",
)
IMAGES = "images"
TAG_FIELDS = ("brand", "season", "composition", "category", "subcategory", "gender")


def product_features(extra_text_fields=()):
  """Returns the tfds FeaturesDict of the product schema plus `extra_text_fields` (all Text)."""
  import tensorflow_datasets as tfds  # Imported lazily: schema constants must not pull TF.

  features = {name: tfds.features.Text() for name in TEXT_FIELDS + tuple(extra_text_fields)}
  features[IMAGES] = tfds.features.Sequence(
      tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"))
  return tfds.features.FeaturesDict(features)
