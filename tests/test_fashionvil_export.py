"""FashionViL interop: export to BertModel + ResNetModel + our torch module, and HF import.

Parity (float32, max |torch - flax| <= 1e-4) on a tiny random model whose every parameter and
BN statistic is perturbed (so a transposed kernel, a wrong row or a missing term shows):
the exported BertModel's own forward equals the text pass; FashionViLTorch reproduces the ITC
embeddings, the fusion pass (with MPFC patch masking and MVC key dropping) and every head.
Import: a tiny transformers BertModel and ResNetModel saved by the test become the system's
BERT and image encoder (their forwards equal ours), visual embeddings start from BERT's.
"""

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from fashion_jax.interop import fashionvil_torch
from fashion_jax.interop import hf_io
from fashion_jax.models import fashionvil as fvil
from fashion_jax.systems import fashionvil as system_lib
from tests import test_fashionvil as tf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TASKS = dict(itc=1.0, mlm=1.0, mpfc=1.0, pac=1.0)


def perturbed(variables, seed=0):
  """Every leaf moved by N(0, 0.1^2) (BN variances drawn in [0.5, 1.5]): no zero bias hides."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables))
  rng = np.random.default_rng(seed)
  out = {}
  for path, x in flat.items():
    x = np.asarray(x, np.float32)
    if path[0] == "batch_stats" and path[-1] == "var":
      out[path] = rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    else:
      out[path] = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def flax_outputs(system, variables, batch, image_keep):
  length = batch["text"].shape[1]

  def fwd(mod, images, ids, mask, patch_mask, keep):
    uni = mod.unimodal(images, ids, mask)
    hidden = mod.fuse(ids, mask, mod.image_tokens(images, patch_mask), keep)
    return {"image": uni["image"], "text": uni["text"], "hidden": hidden,
            "fused": fvil.masked_mean(hidden[:, length:], keep), "itm": mod.itm_logits(hidden),
            "mlm": mod.mlm_logits(hidden[:, :length]),
            "mpfc": mod.mpfc_logits(hidden[:, length:]), "pac": mod.pac_logits(uni["image"])}
  return jax.device_get(system.model.apply(
      variables, batch["image"], batch["text"], batch["text_mask"], batch["patch_mask"],
      image_keep, method=fwd))


@pytest.fixture(scope="module", params=[True, False], ids=["shared", "two_berts"])
def exported(request, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fvil_export")
  c = tf.tiny_config(tmp, **TASKS)
  c.model.share = request.param
  system = system_lib.System(c)
  batch = tf.make_batch(system)
  variables = perturbed(tf.init(system, batch))
  out = system.export(variables, str(tmp / "export"))
  return system, variables, batch, out


def test_export_writes_bertmodel_resnetmodel_and_refuses_a_full_dir(exported):
  system, variables, _, out = exported
  names = {p.name for p in out.iterdir()}
  want = {"bert", "cnn", "fashionvil.safetensors", "fashionvil.json"}
  want |= set() if system.model.fusion_bert is None else {"fusion_bert"}
  assert names == want
  assert (out / "bert" / "tokenizer_config.json").exists()  # The tokenizer travels along.
  with pytest.raises(FileExistsError, match="not empty"):
    system.export(variables, str(out))


def test_exported_bertmodel_is_the_text_pass(exported):
  system, variables, batch, out = exported
  bert = transformers.BertModel.from_pretrained(str(out / "bert")).eval()
  with torch.no_grad():
    got = bert(input_ids=torch.tensor(batch["text"]).long(),
               attention_mask=torch.tensor(batch["text_mask"]).long()).last_hidden_state.numpy()
  want = system.model.apply(variables, batch["text"], batch["text_mask"],
                            method=fvil.FashionViL.text_hidden)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=0)


def test_torch_module_reproduces_embeddings_fusion_and_heads(exported):
  system, variables, batch, out = exported
  module = fashionvil_torch.load_fashionvil_torch(out)
  rng = np.random.default_rng(1)
  keep = rng.random(batch["patch_mask"].shape) < 0.7
  keep[:, 0] = True
  want = flax_outputs(system, variables, batch, keep)
  t = lambda x: torch.tensor(np.asarray(x))
  with torch.no_grad():
    got = module(t(batch["image"]), t(batch["text"]).long(), t(batch["text_mask"]),
                 patch_mask=t(batch["patch_mask"]), image_keep=t(keep))
    img = module.encode_images(t(batch["image"])).numpy()
    txt = module.encode_texts(t(batch["text"]).long(), t(batch["text_mask"])).numpy()
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k].numpy(), np.asarray(want[k]), atol=1e-4, rtol=0,
                               err_msg=k)
  np.testing.assert_allclose(img, system.embed_images(variables, batch["image"]), atol=1e-4)
  text = np.where(batch["text_mask"], batch["text"], system.tokenizer.pad_token_id)
  np.testing.assert_allclose(txt, system.embed_texts(variables, text), atol=1e-4)
  np.testing.assert_allclose(float(module.itc_scale.detach()) ** 2, system.logit_scale(variables),
                             rtol=1e-6)


def _save_hf(tmp_path, vocab_size):
  torch.manual_seed(0)
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=40)).eval()
  bert.save_pretrained(str(tmp_path / "hf_bert"))
  cnn = transformers.ResNetModel(transformers.ResNetConfig(
      embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], layer_type="basic")).eval()
  with torch.no_grad():
    for m in cnn.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  cnn.save_pretrained(str(tmp_path / "hf_resnet"))
  return bert, cnn


def test_import_from_hf_bert_and_resnet_dirs(tmp_path):
  c = tf.tiny_config(tmp_path, itc=1.0, mlm=1.0)
  vocab = system_lib.System(c).tokenizer.vocab_size
  bert, cnn = _save_hf(tmp_path, vocab)
  c.init.hf_bert_dir = str(tmp_path / "hf_bert")
  c.init.hf_resnet_dir = str(tmp_path / "hf_resnet")
  system = system_lib.System(c)
  assert system.model.text_bert.hidden_size == 32 and system.model.image_encoder.widths[-1] == 24
  variables = system.pretrained_params()
  # Exactly the tree (and shapes) a random init has: the trainer places it as is.
  abstract = nn.unbox(jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1)))
  assert (jax.tree.structure(variables) == jax.tree.structure(abstract))
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(variables),
                                                jax.tree.leaves(abstract)))
  batch = tf.make_batch(system)
  with torch.no_grad():
    want_text = bert(input_ids=torch.tensor(batch["text"]).long(),
                     attention_mask=torch.tensor(batch["text_mask"]).long()).last_hidden_state
    x = (torch.tensor(batch["image"]).float().permute(0, 3, 1, 2) / 255.0
         - torch.tensor(fvil.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
             fvil.IMAGENET_STD).view(1, 3, 1, 1)
    want_grid = cnn(pixel_values=x).last_hidden_state.permute(0, 2, 3, 1)
  got_text = system.model.apply(variables, batch["text"], batch["text_mask"],
                                method=fvil.FashionViL.text_hidden)
  np.testing.assert_allclose(np.asarray(got_text), want_text.numpy(), atol=1e-4)
  got_grid = system.model.apply(variables, x.permute(0, 2, 3, 1).numpy(),
                                method=lambda m, im: m.image_encoder(im)["grid"])
  np.testing.assert_allclose(np.asarray(got_grid), want_grid.numpy(), atol=1e-4)
  emb = bert.embeddings
  np.testing.assert_array_equal(variables["params"]["visual_position"],
                                emb.position_embeddings.weight[:tf.GRID ** 2].detach().numpy())
  np.testing.assert_array_equal(variables["params"]["visual_type"],
                                emb.token_type_embeddings.weight[1].detach().numpy())


def test_import_refuses_a_bert_with_another_vocabulary(tmp_path):
  c = tf.tiny_config(tmp_path, itc=1.0)
  _save_hf(tmp_path, 100)
  c.init.hf_bert_dir = str(tmp_path / "hf_bert")
  with pytest.raises(ValueError, match="has 100 word embeddings.*point data.tokenizer.path"):
    system_lib.System(c)
  c.init.hf_bert_dir = ""
  c.init.hf_resnet_dir = str(tmp_path / "hf_bert")
  with pytest.raises(hf_io.CheckpointMismatchError, match="model_type 'resnet'"):
    system_lib.System(c)
