"""The public FashionCLIP API against transformers' CLIPModel + CLIPProcessor on the same inputs."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from fashion_jax import api
from fashion_jax.api import FashionCLIP
from tests.test_clip_parity import TEXTS, make_hf_clip, make_tokenizer, random_images

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              patch_size=8, image_size=32, hidden_act="quick_gelu")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            hidden_act="gelu")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("api")
  tok = make_tokenizer(root / "tok")
  model = make_hf_clip(root / "hf", tok, VISION, TEXT, projection_dim=16, seed=3)
  return root / "hf", model


@pytest.fixture(scope="module")
def fclip(hf_dir):
  return FashionCLIP.from_pretrained(str(hf_dir[0]), batch_size=3)


def _l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_encode_images_matches_clip_processor_and_torch(hf_dir, fclip, tmp_path):
  path, model = hf_dir
  images = random_images(4, seed=1)
  # The same four images as a uint8 array, a PIL image, a file path and a grey [H, W] array.
  Image.fromarray(images[2]).save(tmp_path / "img.png")
  grey = images[3][..., 0]
  inputs = [images[0], Image.fromarray(images[1]), str(tmp_path / "img.png"), grey]
  processor = transformers.CLIPProcessor.from_pretrained(str(path))
  pixel_values = processor(images=images[:3] + [np.repeat(grey[..., None], 3, -1)],
                           return_tensors="pt")["pixel_values"]
  # Host preprocessing + on-device normalisation reproduce CLIPProcessor's pixel values.
  ours_uint8 = fclip.preprocess_images(inputs)
  assert ours_uint8.dtype == np.uint8 and ours_uint8.shape == (4, 32, 32, 3)
  mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258,
                                                                       0.27577711])
  np.testing.assert_allclose((ours_uint8 / 255.0 - mean) / std,
                             pixel_values.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  with torch.no_grad():
    want = model.get_image_features(pixel_values=pixel_values).pooler_output.numpy()
  got = fclip.encode_images(inputs)  # batch_size=3: a full chunk and a padded one.
  np.testing.assert_allclose(got, _l2(want), atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(fclip.encode_images(inputs, normalize=False), want, atol=1e-4)
  # Already-normalised float pixel values, channels-first (CLIPProcessor's) or channels-last.
  np.testing.assert_allclose(fclip.encode_images(pixel_values.numpy()), _l2(want), atol=1e-4)
  np.testing.assert_allclose(fclip.encode_images(pixel_values.numpy().transpose(0, 2, 3, 1)),
                             _l2(want), atol=1e-4)


def test_encode_text_uses_the_checkpoint_tokenizer_and_truncates(hf_dir, fclip):
  path, model = hf_dir
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  long_text = "red silk dress with long sleeves " * 20  # Far beyond the 16-token context.
  texts = TEXTS + [long_text]
  enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
  assert enc["input_ids"].shape[1] == 16
  with torch.no_grad():
    want = model.get_text_features(**enc).pooler_output.numpy()
  np.testing.assert_allclose(fclip.encode_text(texts), _l2(want), atol=1e-4)
  np.testing.assert_allclose(fclip.encode_text(texts, normalize=False), want, atol=1e-4)


def test_zero_shot_uses_both_normalised_sides_and_the_logit_scale(hf_dir, fclip):
  path, model = hf_dir
  labels = ["red dress", "black shoes", "blue silk"]
  images = random_images(3, seed=2)
  processor = transformers.CLIPProcessor.from_pretrained(str(path))
  inputs = processor(text=[f"a photo of a {l}" for l in labels], images=images,
                     return_tensors="pt", padding=True)
  with torch.no_grad():
    want = model(**inputs).logits_per_image.softmax(-1).numpy()
  # One template, as transformers' CLIPModel scores it (the default averages two: prompts.py).
  got = fclip.zero_shot_classify(images, labels, templates="a photo of a {}")
  assert got.shape == (3, 3)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert fclip.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
  with pytest.raises(ValueError, match="has no '{}'"):
    fclip.zero_shot_classify(images, labels, templates="a photo")


def test_save_pretrained_round_trip_and_refusal(fclip, tmp_path):
  out = fclip.save_pretrained(str(tmp_path / "export"))
  again = FashionCLIP.from_pretrained(str(out), batch_size=fclip.batch_size)  # Same shapes.
  images = random_images(2, seed=5)
  np.testing.assert_array_equal(again.encode_images(images), fclip.encode_images(images))
  np.testing.assert_array_equal(again.encode_text(TEXTS), fclip.encode_text(TEXTS))
  with pytest.raises(FileExistsError, match="not empty"):
    fclip.save_pretrained(str(out))
  fclip.save_pretrained(str(out), overwrite=True)


def test_matryoshka_prefix_of_texts_and_images_and_its_round_trip(fclip, tmp_path):
  """dim=m: the first m coordinates of the unnormalised embedding, re-normalised in float64;
  the widths a model was trained at survive save_pretrained / load (config.json)."""
  assert fclip.matryoshka_dims is None  # A transformers checkpoint records none.
  raw = fclip.encode_text(TEXTS, normalize=False).astype(np.float64)
  np.testing.assert_allclose(fclip.encode_text(TEXTS, dim=4), _l2(raw[:, :4]), atol=1e-6)
  images = random_images(2, seed=6)
  raw = fclip.encode_images(images, normalize=False).astype(np.float64)
  np.testing.assert_allclose(fclip.encode_images(images, dim=4), _l2(raw[:, :4]), atol=1e-6)
  np.testing.assert_array_equal(fclip.encode_images(images, dim=16), fclip.encode_images(images))
  for bad in (-1, 17, 2.0, True):
    with pytest.raises(ValueError, match=rf"dim={bad!r}: the embedding prefix must be an int "
                                         r"in \[1, 16\]"):
      fclip.encode_text(TEXTS, dim=bad)
  mrl = FashionCLIP(fclip.config, fclip.params, fclip.tokenizer, matryoshka_dims=(4, 0))
  back = api.load(str(mrl.save_pretrained(str(tmp_path / "mrl"))))
  assert back.matryoshka_dims == (4, 0)
  np.testing.assert_allclose(back.encode_text(TEXTS, dim=4), fclip.encode_text(TEXTS, dim=4),
                             atol=1e-6)  # Another batch size: another compiled shape.
  with pytest.raises(ValueError, match=r"matryoshka_dims=\(4, 4\) repeats a dimension"):
    FashionCLIP(fclip.config, fclip.params, fclip.tokenizer, matryoshka_dims=(4, 4))


def test_bad_inputs_raise_clear_errors(fclip):
  with pytest.raises(ValueError, match=r"do not match the model's input 32x32x3"):
    fclip.encode_images(np.zeros((2, 3, 24, 24), np.float32))
  with pytest.raises(ValueError, match="must be \\[N, 3, S, S\\]"):
    fclip.encode_images(np.zeros((3, 32, 32), np.float32))
  with pytest.raises(TypeError, match="Unsupported image type int"):
    fclip.encode_images([3])
  for empty in ([], ()):  # Not numpy's "need at least one array to stack" / an IndexError.
    with pytest.raises(ValueError, match=r"No images given \(an empty list\)"):
      fclip.encode_images(empty)
    with pytest.raises(ValueError, match=r"No texts given \(an empty list\)"):
      fclip.encode_text(empty)
  with pytest.raises(ValueError, match=r"No images given"):
    fclip.zero_shot_classify([], ["dress"])
  bare = FashionCLIP(fclip.config, fclip.params, tokenizer=None)
  with pytest.raises(ValueError, match="has no tokenizer"):
    bare.encode_text(["red dress"])


def test_load_picks_clip_and_subclasses_refuse_the_other_kind(hf_dir, fclip):
  path, _ = hf_dir
  model = api.load(str(path))
  assert type(model) is FashionCLIP and model.config == fclip.config
  with pytest.raises(ValueError, match="is a CLIP checkpoint, not a SigLIP one"):
    api.FashionSigLIP.from_pretrained(str(path))


def test_text_clean_is_applied_before_the_tokenizer(fclip):
  plain = FashionCLIP(fclip.config, fclip.params, fclip.tokenizer)
  clean = FashionCLIP(fclip.config, fclip.params, fclip.tokenizer, text_clean="canonicalize")
  ids, mask = clean.tokenize(["  Red, &amp; DRESS!"])
  want_ids, want_mask = plain.tokenize(["red dress"])
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(mask, want_mask)
  assert not np.array_equal(plain.tokenize(["Red, DRESS!"])[0], want_ids)
  with pytest.raises(ValueError, match="Unknown text_clean 'ftfy'"):
    FashionCLIP(fclip.config, fclip.params, fclip.tokenizer, text_clean="ftfy")
  with pytest.raises(ValueError, match="Unknown resize_mode 'longest'"):
    FashionCLIP(fclip.config, fclip.params, resize_mode="longest")
