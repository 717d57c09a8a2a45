"""benchmarks/profile_account.py on hand-made kernel timelines (the real traces need a GPU/TPU)."""

import pytest

from benchmarks import benchmark
from benchmarks import profile_account as pa


def test_categories_of_vendor_kernel_names():
  names = {
      "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "matmul",
      "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN": "matmul",
      "gemm_fusion_dot_17": "matmul",
      "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "attention",
      "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)": "attention",
      "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
      "loop_convert_fusion_3": "elementwise",
      "input_reduce_fusion_12": "reduction",
      "loop_transpose_fusion": "copy/transpose",
      "MemcpyD2D": "memcpy",
      "some_vendor_kernel": "other",
  }
  for name, want in names.items():
    assert pa.categorize(name) == want, name


def test_union_counts_overlaps_once():
  assert pa.union_length([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
  assert pa.union_length([]) == 0


def test_account_shares_idle_and_gemm_rate():
  # Two steps of 100 ns each: a 50 ns GEMM, a 20 ns fusion overlapping it by 10 ns, 30 ns idle.
  events = []
  for t in (0, 100):
    events += [("nvjet_gemm", t, 50, "dot.1"), ("loop_add_fusion", t + 40, 20, None)]
  acc = pa.account_events(events, steps=2, step_s=100e-9, matmul_flops=5e6)
  assert acc["busy_ms"] == pytest.approx(60e-6)
  assert acc["idle_share"] == pytest.approx(0.4)
  assert acc["categories"]["matmul"]["share"] == pytest.approx(0.5)
  assert acc["categories"]["elementwise"]["share"] == pytest.approx(0.2)
  assert acc["top_kernels"][0]["name"] == "nvjet_gemm"
  assert acc["top_kernels"][0]["hlo_op"] == "dot.1"
  # 5e6 FLOPs in 50 ns of GEMM kernels = 1e14 FLOP/s = 100 TFLOP/s.
  assert acc["matmul_tflops_in_matmul_kernels"] == pytest.approx(100.0)


def test_account_refuses_an_empty_trace():
  with pytest.raises(ValueError, match="No device kernels"):
    pa.account_events([], steps=3)


def test_benchmark_profile_needs_an_accelerator(capsys):
  with pytest.raises(SystemExit):
    benchmark.main(["--systems=fashionclip", "--profile_dir=/tmp/nowhere"])
  assert "only CPU devices" in capsys.readouterr().err


def test_benchmark_batch_is_random_where_values_matter():
  import numpy as np  # pylint: disable=g-import-not-at-top
  zeros = {"image": np.zeros((4, 8, 8, 3), np.uint8), "text": np.zeros((4, 16), np.int32),
           "features": np.zeros((4, 5), np.float32), "label": np.zeros((4,), np.int32)}
  b = benchmark.random_batch(zeros, vocab_size=100)
  assert b["image"].dtype == np.uint8 and b["image"].std() > 50
  assert b["text"].min() >= 0 and b["text"].max() < 100 and len(np.unique(b["text"])) > 20
  assert b["features"].std() > 0.5
  np.testing.assert_array_equal(b["label"], zeros["label"])  # Not token ids: left alone.
  np.testing.assert_array_equal(benchmark.random_batch(zeros)["text"], zeros["text"])
