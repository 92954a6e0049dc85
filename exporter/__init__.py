"""Resolve a MODEL spec to a torch module plus an input spec, export it to ONNX, check parity.

This package's foundation modules (``errors``, ``spec``) import only the standard library and
NumPy, so the runtime and the passes can use them without pulling in torch. Everything that
needs torch (``zoo``, ``resolve``, ``export``, ``parity``) is imported explicitly by its user.
"""
