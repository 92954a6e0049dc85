"""``planforge bench`` (bundles per backend and batch), ``bench-passes`` (the passes, INT8 against
its peers), where each ran, and the reports."""
