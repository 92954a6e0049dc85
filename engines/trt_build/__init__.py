"""TensorRT: whether it is usable here and why not (``status``), the thin strongly-typed builder
(``builder``), and the engine and timing caches (``cache``). Importing this package imports nothing
heavy: ``tensorrt`` is imported by the functions that need it."""
