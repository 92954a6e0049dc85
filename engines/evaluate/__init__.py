"""Judging bundles: ``compare`` (every artifact against its reference, with Polygraphy) and
``bench`` (speed per backend and batch size, INT8 against its peers)."""
