"""Seeded small decoders of the families the decoder work supports (Gemma 3 with 1 KV head and
sliding-window layers, LLaMA and Qwen2 with grouped-query attention, GPT-2 with learned positions), their
export, and the ONNX Runtime pass pipeline over it: what the decoder tests share."""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

from exporter.decoder import FlatCacheDecoder, decoder_info, export_decoder, parity_feeds
from passes import PassManager, pipeline

VOCAB = 96
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)]


def _gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0))


FAMILIES = {"gemma3_text": _gemma3, "llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}


def seeded(family: str) -> torch.nn.Module:
    """The family's small model, seeded, with norms away from 1 (or 0 for Gemma's 1 + w), so a wrong norm
    shows in the numbers."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.normal_(0.0 if family == "gemma3_text" else 1.0, 0.3)
    return model


def exported(model: torch.nn.Module, directory, max_length: int = 64):
    """(DecoderInfo, model.onnx path) of the one-graph export."""
    info = decoder_info(model.config, max_length)
    path = directory / "model.onnx"
    export_decoder(FlatCacheDecoder(model).eval(), info, path)
    return info, path


def ort_pipeline(model: torch.nn.Module, info, path, out):
    """The ``ort`` FP32 pass pipeline over the export, verified after every pass on the build's parity feeds
    (a prefill and a decode step); returns (DecoderInfo for the shared cache, the graph, the pass records)."""
    feeds = list(parity_feeds(FlatCacheDecoder(model).eval(), info).values())
    graph, records = PassManager(pipeline("ort", "fp32"), verify_feeds=feeds, scaled=True).run(onnx.load(str(path)))
    onnx.save(graph, str(out))
    return dataclasses.replace(info, cache="shared"), graph, records


_EXPORTS = Path(tempfile.mkdtemp(prefix="planforge-decoders-"))
atexit.register(shutil.rmtree, _EXPORTS, ignore_errors=True)
RUN_DIR = "PLANFORGE_TEST_RUN_DIR"  # set by conftest: a directory every worker of one pytest run shares


def shared(name: str, make) -> Path:
    """``name``'s directory in the test run's shared directory, made by ``make(directory)`` by the first
    process of the run to ask, under a lock; the others wait, then read it. Complete once its ``.done``
    marker exists (a process that died half-way leaves none, and the next one starts again). Made in place,
    not renamed into place: a bundle records its source's path."""
    root = Path(os.environ.get(RUN_DIR) or _EXPORTS) / "shared"
    root.mkdir(parents=True, exist_ok=True)
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (directory / ".done").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            (directory / ".done").touch()
    return directory


@functools.cache
def family_export(family: str):
    """(model, DecoderInfo, model.onnx) of a family's seeded model, exported once per test run: the decoder
    test files share it (an export takes 10-25 s, and make test has ten minutes). The seeded weights are the
    same in every process, so every pytest-xdist worker reads the first one's file."""
    model = seeded(family)
    directory = shared(f"export-{family}", lambda d: exported(model, d))
    return model, decoder_info(model.config, 64), directory / "model.onnx"


@functools.cache
def tiny_llama_bundle() -> tuple[Path, Path]:
    """(bundle, Hugging Face directory): what ``planforge build DIR --max-length 64`` makes of ``tiny_llama``,
    built once per test run and read by the tests that need an FP32 decoder bundle (copy it to change it)."""
    def make(directory: Path) -> None:  # the build's API, not the CLI: the test that asks first captures stdout
        from engines.build import BuildRequest, ExportOptions, build

        tiny_llama(directory)
        build(BuildRequest(str(directory / "tiny-llama"), out=directory / "bundle", build_root=directory,
                           export=ExportOptions(max_length=64)))

    directory = shared("tiny-llama-bundle", make)
    return directory / "bundle", directory / "tiny-llama"


@functools.cache
def family_ort(family: str):
    """(DecoderInfo, graph, pass records, model.ort.onnx) of the ``ort`` pipeline over ``family_export``, run in
    each process (its records are objects) and written to the process's own directory."""
    model, info, path = family_export(family)
    out = _EXPORTS / f"{family}.ort.onnx"
    cache_info, graph, records = ort_pipeline(model, info, path, out)
    return cache_info, graph, records, out


# A chat template in the words of the tiny vocabulary: each message as "w1 <role word> <content>", then "w2"
# (transformers' apply_chat_template renders it the same way as planforge's server, which the tests check).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}w1 {{ 'w3' if m['role'] == 'user' else 'w4' }} "
                 "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w2{% endif %}")


def assert_same_decoding(before: onnx.ModelProto, after: onnx.ModelProto, info, seed: int, prompt: int,
                         atol: float = 1e-5, rtol: float = 1e-5, steps: int = 5) -> None:
    """Two graphs of one decoder (unpadded, a growing cache) give the same logits and presents over a prefill of
    ``prompt`` tokens for 2 rows and ``steps - 1`` greedy decode steps, under ONNX Runtime."""
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (before, after)]
    names = [o.name for o in sessions[0].get_outputs()]
    rng = np.random.default_rng(seed)
    pasts = {n: np.zeros((2, info.kv_heads, 24, info.head_dim), np.float32) for n in info.past_names}
    ids, done = rng.integers(3, info.vocab, (2, prompt)), 0
    for step in range(steps):
        feeds = {"input_ids": ids, "attention_mask": np.ones((2, done + ids.shape[1]), np.int64),
                 "position_ids": np.tile(np.arange(done, done + ids.shape[1]), (2, 1)), **pasts}
        expected, got = (dict(zip(names, s.run(None, feeds))) for s in sessions)
        for name in names:
            np.testing.assert_allclose(got[name], expected[name], atol=atol, rtol=rtol, err_msg=f"{name} {step}")
        done += ids.shape[1]
        pasts = {p: expected[q] for p, q in zip(info.past_names, info.present_names)}
        ids = expected["logits"][:, -1:].argmax(-1)


def tiny_llama(root):
    """A seeded LLaMA-style model (GQA) saved as a Hugging Face directory with a word-level tokenizer made
    here (BOS first): (directory, model, tokenizer)."""
    import tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    directory = root / "tiny-llama"
    model.save_pretrained(str(directory))
    fast = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    fast.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return directory, model, tokenizer
