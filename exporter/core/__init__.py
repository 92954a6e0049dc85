"""The torch-free foundation that exporter, passes and engines share: errors, the input spec,
dtype names, numerics and file hashing. Standard library and NumPy only; imports nothing else
of planforge, so the lean runtime and the passes can use it without torch."""
