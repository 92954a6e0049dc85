"""The ``planforge`` commands, one module per group: ``build`` (build, export, optimize, zoo),
``evaluate`` (inspect, compare, debug, check-trt), ``bench`` (bench and its variants), ``deploy``
(triton-repo, pack) and ``runtime`` (run). Each command parses, calls the library and presents."""
