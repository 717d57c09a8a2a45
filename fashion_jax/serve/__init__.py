"""An HTTP product-search service over a saved ProductIndex (docs/serve.md)."""
