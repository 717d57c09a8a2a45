"""Product search: vector indexes, model encoders and catalog indexes (see launch/search.py)."""
