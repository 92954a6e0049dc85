"""Resolve a MODEL spec to a torch module plus an input spec, export it to ONNX, check parity.

Everything here may need torch (``zoo``, ``resolve``, ``export``, ``parity``) and is imported
explicitly by its user; what the passes and the runtime share with it lives in ``foundation``.
"""
