"""Language-model decoders: a local Hugging Face ``*ForCausalLM`` directory or a ``.gguf`` file, exported
as one graph for prefill and decode.

The graph takes ``input_ids [batch, seq]``, ``attention_mask [batch, total]``, ``position_ids [batch,
seq]`` and, per layer N, ``past_key_values.N.key`` / ``.value [batch, kv_heads, past, head_dim]``, and
returns ``logits [batch, seq, vocab]`` and ``present.N.key`` / ``.value [batch, kv_heads, total,
head_dim]`` (``total = past + seq``): the names and layout onnxruntime-genai and Hugging Face use. A
prefill is a call with ``past = 0``; a decode step feeds the presents back with one new token. No
``If``: the exporter is torch's dynamo exporter, which keeps the cache length symbolic where the
TorchScript tracer bakes Python branches on it into the graph.

The cache goes in as a ``DynamicCache`` built from the flat tensors without a config, so every layer
keeps its whole history (sliding-window layers are masked by the window, not trimmed): the presents of
all layers have one length, as one graph needs. A GGUF file loads through transformers (its
dequantized weights, its tokenizer); the first load of a file is slow (a minute for Gemma 3 270M), so
the model is kept, re-saved as safetensors with its tokenizer, in the cache directory under the file's
sha256. Measurements behind these choices: docs/decisions/008-decoder-graph.md.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from exporter.export import quiet_exporters, save_checked
from exporter.hf import offline_and_quiet
from exporter.resolved import ResolvedModel
from foundation.decoder import DECODER_OPSET, DecoderInfo
from foundation.errors import ExportError, UsageError
from foundation.files import sha256_source
from foundation.spec import InputSpec

logger = logging.getLogger(__name__)

# model_type -> whether the family was checked here (export parity and greedy equality with transformers).
SUPPORTED = ("gemma3_text", "llama", "qwen2", "mistral", "gpt2")
LLM_EXTRA = "pip install '.[llm]' (transformers, gguf, accelerate)"
DEFAULT_MAX_LENGTH = 2048


class FlatCacheDecoder(torch.nn.Module):
    """Calls a ``*ForCausalLM`` with its cache as flat ``past`` tensors and returns logits and the presents."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # transformers 5 renamed the forward's past_key_values to cache (the old name still works, with a warning)
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache  # noqa: PLC0415 - optional extra, only for decoders

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_keyword: cache})
        present = out["cache"] if "cache" in out else out.past_key_values  # transformers 5's name, or 4's
        return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])


def is_decoder_source(path: Path) -> bool:
    """A ``.gguf`` file, or a Hugging Face directory whose config names a ``*ForCausalLM`` architecture."""
    if path.suffix == ".gguf":
        return True
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    import json  # noqa: PLC0415 - only here

    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)


def resolve_decoder(path: Path, cache_dir: Path, max_length: int | None = None) -> ResolvedModel:
    """A decoder source as a ``ResolvedModel`` whose module is a ``FlatCacheDecoder`` (module docstring)."""
    path = Path(path)
    source_sha256 = sha256_source(path)
    directory = _gguf_as_directory(path, source_sha256, cache_dir) if path.suffix == ".gguf" else path
    model = load_causal_lm(directory)
    info = decoder_info(model.config, max_length)
    outputs = ("logits", *info.present_names)
    return ResolvedModel(path.stem, "decoder", str(path.resolve()), decoder_spec(info), outputs, source_sha256,
                         "generation", FlatCacheDecoder(model).eval(), decoder=info, tokenizer_dir=directory)


def load_causal_lm(directory: Path) -> torch.nn.Module:
    """A local ``*ForCausalLM`` directory as an FP32 eval module, offline; refused with the supported list."""
    try:
        with offline_and_quiet() as transformers:
            config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
            family = getattr(config, "model_type", "?")
            if family not in SUPPORTED:
                raise UsageError(f"{directory}: decoder architecture {family!r} is not supported; supported: "
                                 f"{', '.join(SUPPORTED)}")
            return transformers.AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, dtype=torch.float32).eval()
    except UsageError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ...
        raise ExportError(f"transformers could not load the decoder {directory}: {type(exc).__name__}: {exc}") from exc


def _gguf_as_directory(path: Path, sha256: str, cache_dir: Path) -> Path:
    """The GGUF file's model and tokenizer as a Hugging Face directory in ``cache_dir`` (made once per file)."""
    target = Path(cache_dir) / f"gguf-{sha256[:16]}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401, PLC0415 - transformers reads GGUF files with it; checked for a clear message
    except ImportError as exc:
        raise UsageError(f"{path} is a GGUF file, which needs the gguf package: {LLM_EXTRA}") from exc
    logger.info("%s: loading the GGUF file through transformers (dequantized to FP32; once per file)", path)
    with offline_and_quiet() as transformers:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=torch.float32)
        except Exception as exc:  # transformers raises several types for a file it cannot read
            raise ExportError(f"transformers could not read the GGUF file {path}: {type(exc).__name__}: {exc}") \
                from exc
        _save_plain(model, tokenizer, target)
    return target


def _save_plain(model, tokenizer, target: Path) -> None:
    """transformers refuses to save a GGUF-loaded model: the same weights go into a plain model of its class."""
    import tempfile  # noqa: PLC0415 - only here

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        Path(tmp).rename(target)


def decoder_info(config, max_length: int | None = None) -> DecoderInfo:
    """The cache layout and special tokens of a transformers decoder config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    limit = int(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)
    eos = getattr(config, "eos_token_id", None)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    window = getattr(config, "sliding_window", None)
    return DecoderInfo(config.model_type, int(config.num_hidden_layers), kv_heads, int(head_dim),
                       int(config.vocab_size), min(max_length or DEFAULT_MAX_LENGTH, limit),
                       getattr(config, "bos_token_id", None), eos, getattr(config, "pad_token_id", None),
                       int(window) if window else None)


def decoder_spec(info: DecoderInfo, max_batch: int = 4) -> InputSpec:
    """The inputs with shape points that hold ``total = past + seq`` at min (1 = 0 + 1), opt and max."""
    n = info.max_length
    prompt = max(1, min(16, n // 2))
    texts = [f"input_ids:int64:[batch=1..{max_batch}@1,seq=1..{n // 2}@{prompt}]:0..{info.vocab}",
             f"attention_mask:int64:[batch,total=1..{n}@{2 * prompt}]:0..2",
             f"position_ids:int64:[batch,seq]:0..{n}"]
    texts += [f"{name}:float32:[batch,{info.kv_heads},past=0..{n - n // 2}@{prompt},{info.head_dim}]"
              for name in info.past_names]
    return InputSpec.parse(texts)


def export_decoder(module: FlatCacheDecoder, info: DecoderInfo, path: Path, opset: int = DECODER_OPSET) -> bool:
    """One graph for prefill and decode (module docstring), written to ``path`` with its weights inline, or
    beside it as external data over 2 GB (returned: whether they are)."""
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    b, s, p = 2, 3, 5  # sizes above 1 and distinct, so the exporter specializes none of them
    example = (torch.randint(0, info.vocab, (b, s)), torch.ones(b, p + s, dtype=torch.int64),
               torch.arange(p, p + s).repeat(b, 1),
               *[torch.zeros(b, info.kv_heads, p, info.head_dim) for _ in info.past_names])
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in info.past_names)}
    names_in = ["input_ids", "attention_mask", "position_ids", *info.past_names]
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with quiet_exporters():
                program = torch.onnx.export(module, example, dynamo=True, input_names=names_in,
                                            output_names=["logits", *info.present_names], dynamic_shapes=shapes,
                                            opset_version=opset, optimize=True)
                program.save(str(raw), external_data=True)
        except Exception as exc:  # the exporter raises many types
            raise ExportError(f"the dynamo exporter could not export the {info.family} decoder: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        return save_checked(onnx.load(str(raw)), path)


def parity_feeds(module: FlatCacheDecoder, info: DecoderInfo, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Feeds for the parity check and golden.npz, whose dims hold ``total = past + seq``: a ``prefill`` of
    two seeded prompts, and a ``decode`` of two more tokens for the first of them on the prefill's presents
    (computed by PyTorch, so both runtimes read the same cache); batch, seq, past and total all differ
    between the two, so the outputs' dims are told apart by how they move. No padding: a padded position's
    logits are undefined (its query sees no key) and differ between runtimes; padded batches are checked by
    generation against transformers."""
    rng = np.random.default_rng(seed)
    longest = max(2, min(8, info.max_length // 2))
    ids = rng.integers(0, info.vocab, (2, longest))
    mask = np.ones((2, longest), np.int64)
    empty = np.zeros((2, info.kv_heads, 0, info.head_dim), np.float32)
    prefill = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0),
               **{name: empty for name in info.past_names}}
    with torch.no_grad():
        outputs = module(*[torch.from_numpy(v) for v in prefill.values()])
    decode = {"input_ids": rng.integers(0, info.vocab, (1, 2)), "attention_mask": np.ones((1, longest + 2), np.int64),
              "position_ids": np.arange(longest, longest + 2)[None],
              **{name: t[:1].numpy() for name, t in zip(info.past_names, outputs[1:])}}
    return {"prefill": prefill, "decode": decode}
