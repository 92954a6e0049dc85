"""planforge's torch-free foundation, imported by every other package (exporter, passes, engines):
errors, the input and output spec, dtype names, numerics (comparisons, budgets, where an error
starts), sequences of stateful calls, data files, golden data, user-function loading and ONNX
Runtime sessions. Standard library and NumPy only (ONNX Runtime in ``ort_session``), and nothing
else of planforge, so the lean runtime and the passes use it without torch."""
