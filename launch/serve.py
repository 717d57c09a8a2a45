r"""Product search over HTTP: a JSON API and a search page (docs/serve.md).

    python -m launch.search build --model=runs/fashionclip_smoke \
        --dataset=synthetic_catalog/smoke --split=test --index_dir=runs/search_test
    python -m launch.serve --index_dir=runs/search_test --port=8000
    # http://localhost:8000/ : the page; /docs: the API; /healthz, /readyz: probes.

The model is the one the index was built with (meta.json) unless --model / --step say
otherwise; a model other than the index's is refused at load (/readyz reports why) unless
--allow_model_mismatch. Needs the `serve` extra (pip install -e .[serve]).
"""

from absl import app
from absl import flags
from absl import logging

from fashion_jax.search import encoders
from fashion_jax.search import products
from fashion_jax.serve import app as serve_app

_INDEX_DIR = flags.DEFINE_string("index_dir", None, "Directory of a product index "
                                 "(python -m launch.search build).", required=True)
_MODEL = flags.DEFINE_string("model", None, "Training workdir or exported CLIPModel directory "
                             "(default: the index's model).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: newest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 10.0, "Largest upload (MB); larger: 413.")
_MAX_K = flags.DEFINE_integer("max_k", 100, "Largest k a request may ask for.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most queries encoded in one model call.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 5.0, "Longest a query waits for others to "
                                  "share its model call.")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 60.0, "A query waiting longer gets 503.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every batch shape before /readyz says ready.")
_ALLOW_MISMATCH = flags.DEFINE_bool("allow_model_mismatch", False, "Serve with a model other "
                                    "than the one the index was built with (results suspect).")


def main(argv):
  del argv
  import uvicorn  # pylint: disable=g-import-not-at-top  # Optional dependency (serve extra).
  index_dir, model, step = _INDEX_DIR.value, _MODEL.value, _STEP.value
  allow = _ALLOW_MISMATCH.value
  config = serve_app.ServeConfig(
      max_upload_bytes=int(_MAX_UPLOAD_MB.value * 2**20), max_k=_MAX_K.value,
      max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT_MS.value,
      request_timeout_s=_TIMEOUT.value, warmup=_WARMUP.value)

  def load():
    index = products.ProductIndex.load(index_dir, allow_model_mismatch=allow)
    # The towers' own batch is the batcher's largest, so a batch is one forward pass.
    encoder = encoders.load_encoder(model or index.meta["model"], step=step,
                                    batch_size=config.max_batch)
    return index, encoder

  logging.info("Serving %s on http://%s:%d/", index_dir, _HOST.value, _PORT.value)
  uvicorn.run(serve_app.create_app(load, config), host=_HOST.value, port=_PORT.value,
              log_level="warning", access_log=False)


if __name__ == "__main__":
  app.run(main)
