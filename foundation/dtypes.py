"""ONNX tensor element types by the NumPy dtype names planforge's specs use."""

ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32",
               3: "int8", 2: "uint8", 9: "bool"}
