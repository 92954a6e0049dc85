"""The Open Inference Protocol (KServe v2; Triton, KServe, Seldon and OpenVINO Model Server speak it) for
every bundle that is not a decoder: ``/v2/models/{name}/infer``, ``/v2/models/{name}`` metadata,
``/v2/models/{name}/ready``, and the server's ``/v2`` metadata.

Tensors travel as JSON (``data``: a flat or nested list in row-major order) or, with the binary tensor data
extension Triton's clients use, as raw little-endian bytes after the JSON header: the request's
``Inference-Header-Content-Length`` header gives the JSON's length, each binary input says its
``binary_data_size``, in order. Outputs are binary when the request asks (``binary_data`` on a requested
output, or ``binary_data_output`` in the request's parameters), else JSON. This module only translates;
the request runs through the bundle's dynamic batcher (``engines.runtime.scheduler``). BYTES tensors are
refused (no bundle takes strings).
"""

from __future__ import annotations

import json

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engines.serve.errors import ApiError, classify, headers
from engines.serve.models import Served

HEADER = "inference-header-content-length"
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}


def error_response(exc: BaseException) -> JSONResponse:
    error = classify(exc)
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers(error))


def server_metadata(version: str) -> JSONResponse:
    return JSONResponse({"name": "planforge", "version": version, "extensions": ["binary_tensor_data"]})


def model(models: dict[str, Served], name: str) -> Served:
    found = models.get(name)
    if found is None or found.decoder:
        others = [k for k, m in models.items() if not m.decoder]
        hint = " (a decoder: it is served at /v1)" if found is not None else ""
        raise ApiError(404, f"model {name!r} is not served at /v2{hint}; served: {', '.join(others) or 'none'}")
    return found


def metadata(served: Served) -> JSONResponse:
    scheduler = served.scheduler
    inputs = [{"name": t.name, "datatype": NAMES[np.dtype(t.dtype)],
               "shape": [d.max if not d.is_dynamic else -1 for d in t.dims]} for t in scheduler.input_spec]
    outputs = [{"name": o.name, "datatype": NAMES.get(np.dtype(o.dtype), "FP32"),
                "shape": [d if isinstance(d, int) else -1 for d in o.shape]} for o in scheduler.output_specs]
    return JSONResponse({"name": served.name, "versions": ["1"], "platform": f"planforge_{scheduler.backend}",
                         "inputs": inputs, "outputs": outputs})


async def infer(served: Served, body: bytes, request: Request) -> Response:
    doc, binary = _split(body, request.headers.get(HEADER))
    feeds = _inputs(served, doc, binary)
    outputs = await served.scheduler.infer_async(feeds)
    return _response(served, doc, outputs)


def _split(body: bytes, header: str | None) -> tuple[dict, bytes]:
    size = len(body)
    if header is not None:
        try:
            size = int(header)
        except ValueError:
            raise ApiError(400, f"header Inference-Header-Content-Length = {header!r}: expected an integer") from None
        if not 0 < size <= len(body):
            raise ApiError(400, f"header Inference-Header-Content-Length = {size}: the body has {len(body)} bytes")
    try:
        doc = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request's JSON does not parse: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ApiError(400, "the request must be a JSON object with an 'inputs' list", "inputs")
    return doc, body[size:]


def _inputs(served: Served, doc: dict, binary: bytes) -> dict[str, np.ndarray]:
    spec = served.scheduler.input_spec
    feeds, offset = {}, 0
    for k, item in enumerate(doc["inputs"]):
        where = f"inputs[{k}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object with name, shape, datatype and data", where)
        name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
        if name not in spec.names:
            raise ApiError(400, f"{where}.name = {name!r}: the model's inputs are {', '.join(spec.names)}",
                           f"{where}.name")
        expected = NAMES[np.dtype(spec[name].dtype)]
        if datatype != expected:
            raise ApiError(400, f"{where} ({name}).datatype = {datatype!r}: expected {expected}", f"{where}.datatype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ApiError(400, f"{where} ({name}).shape must be a list of non-negative integers", f"{where}.shape")
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        count = int(np.prod(shape))
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count * dtype.itemsize or offset + size > len(binary):
                raise ApiError(400, f"{where} ({name}): binary_data_size {size} for shape {shape} {datatype} "
                               f"(expected {count * dtype.itemsize} bytes, {len(binary) - offset} left in the body)",
                               f"{where}.parameters.binary_data_size")
            array = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            try:
                array = np.asarray(item.get("data"), dtype=dtype)
            except (TypeError, ValueError) as exc:
                raise ApiError(400, f"{where} ({name}).data does not hold {datatype} values: {exc}",
                               f"{where}.data") from None
            if array.size != count:
                raise ApiError(400, f"{where} ({name}).data holds {array.size} values; shape {shape} needs {count}",
                               f"{where}.data")
            array = array.reshape(shape)
        if name in feeds:
            raise ApiError(400, f"{where}: input {name!r} is given twice", f"{where}.name")
        feeds[name] = np.ascontiguousarray(array.astype(dtype.newbyteorder("="), copy=False))
    missing = [n for n in spec.names if n not in feeds]
    if missing:
        raise ApiError(400, f"inputs {', '.join(missing)} are missing", "inputs")
    return feeds


def _response(served: Served, doc: dict, outputs: dict[str, np.ndarray]) -> Response:
    wanted = doc.get("outputs")
    default_binary = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    if wanted is None:
        wanted = [{"name": name} for name in outputs]
    if not isinstance(wanted, list):
        raise ApiError(400, "'outputs' must be a list of {name, parameters}", "outputs")
    described, chunks = [], []
    for k, item in enumerate(wanted):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in outputs:
            raise ApiError(400, f"outputs[{k}].name = {name!r}: the model's outputs are {', '.join(outputs)}",
                           f"outputs[{k}].name")
        array = outputs[name]
        entry = {"name": name, "datatype": NAMES[array.dtype], "shape": list(array.shape)}
        if (item.get("parameters") or {}).get("binary_data", default_binary):
            data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        described.append(entry)
    result = {"model_name": served.name, "model_version": "1", "outputs": described}
    if "id" in doc:
        result["id"] = doc["id"]
    text = json.dumps(result).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *chunks]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})
