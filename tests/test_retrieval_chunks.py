"""The full protocol's chunk plan: balanced chunks, little padding, sharded == unsharded."""

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from fashion_jax.evaluate import retrieval


@pytest.mark.parametrize("nq,ng,qc,gc,shards", [
    (100_000, 100_000, 1024, 1024, 8), (100_000, 100_000, 1024, 1024, 1), (7, 5, 1024, 1024, 8),
    (1, 1, 1, 1, 1), (1000, 999, 64, 100, 4), (8193, 4097, 1024, 1024, 2)])
def test_chunk_plan_is_balanced(nq, ng, qc, gc, shards):
  ca, na, cb, nb = retrieval.chunk_plan(nq, ng, qc, gc, shards)
  assert 1 <= ca <= qc and 1 <= cb <= gc
  assert na % shards == 0 and na * ca >= nq and nb * cb >= ng
  # Fewest chunks of at most the requested size, padding under one row per chunk.
  per_shard = -(-nq // shards)
  assert na // shards == -(-per_shard // qc)
  assert (na // shards) * ca - per_shard < na // shards
  assert nb == -(-ng // gc) and nb * cb - ng < nb


def test_chunk_plan_rejects_bad_sizes():
  with pytest.raises(ValueError, match="shards=0"):
    retrieval.chunk_plan(10, 10, 4, 4, 0)
  with pytest.raises(ValueError, match="-1"):
    retrieval.chunk_plan(10, 10, -1, 4, 1)


def test_sharded_equals_unsharded_with_uneven_shards():
  """Nq not a multiple of shards x chunk: padding rows never count, both directions."""
  rng = np.random.default_rng(3)
  t = rng.standard_normal((203, 16)).astype(np.float32)
  i = (t + 2 * rng.standard_normal((203, 16))).astype(np.float32)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  a = retrieval.full_ranks(t, i, None, query_chunk=16, gallery_chunk=24)
  b = retrieval.full_ranks(t, i, None, query_chunk=16, gallery_chunk=24, mesh=mesh)
  s = t.astype(np.float64) @ i.T.astype(np.float64)
  ref_q = (s >= np.diagonal(s)[:, None]).sum(1)
  ref_g = (s >= np.diagonal(s)[None, :]).sum(0)
  np.testing.assert_array_equal(a[0][:, 0], b[0][:, 0])
  np.testing.assert_array_equal(a[1][:, 0], b[1][:, 0])
  np.testing.assert_array_equal(a[0][:, 0], ref_q)
  np.testing.assert_array_equal(a[1][:, 0], ref_g)
