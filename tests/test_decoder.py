"""Decoders (``exporter.decoder``, ``engines.runtime.generate``) on seeded small configs of the families
the issue names: Gemma 3 (1 KV head, sliding-window layers), LLaMA and Qwen2 (grouped-query attention),
GPT-2 (learned positions). One graph for prefill and decode; its logits against transformers' at the
prefill and over 16 decode steps; greedy generation token-identical to transformers' ``generate`` on a
padded batch of prompts; sampling reproducible by seed; bad requests refused with the reason. Generation
runs on both cache forms: the export as it is (a growing cache, left padding) and after the ``ort`` passes
(GroupQueryAttention over one shared buffer, right padding)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

transformers = pytest.importorskip("transformers")

from decoders import FAMILIES, VOCAB, family_export, family_ort  # noqa: E402

from engines.runtime.generate import GenerationError, Generator, Sampling  # noqa: E402


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def decoder(request):
    model, info, path = family_export(request.param)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, info, path, session


@pytest.fixture(scope="module", params=["grow", "shared"])
def generation(request, decoder):
    """(model, info, session) of the export as it is (a growing cache, left padding), or after the ``ort``
    passes (GroupQueryAttention: one shared cache buffer, right padding)."""
    model, info, path, session = decoder
    if request.param == "grow":
        return model, info, session
    info, _, _, fused = family_ort(info.family)
    return model, info, ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])


def _reference_logits(model, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """transformers with its own cache: the prefill's logits, then each greedy step's."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        logits, tokens = [out.logits.numpy()], []
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits.numpy())
    return logits, tokens


def test_one_graph_for_prefill_and_decode_with_the_genai_names(decoder):
    _, info, path, session = decoder
    graph = onnx.load(str(path), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type in ("If", "Loop", "Scan")]
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *info.past_names]
    assert [o.name for o in session.get_outputs()] == ["logits", *info.present_names]
    past = session.get_inputs()[3].shape
    assert past[1:] == [info.kv_heads, past[2], info.head_dim] and isinstance(past[2], str)


def test_logits_match_transformers_at_prefill_and_over_16_decode_steps(decoder):
    model, info, _, session = decoder
    prompt = [2, 10, 20, 30, 40, 50, 60]  # longer than Gemma's sliding window of 4
    expected, tokens = _reference_logits(model, prompt, 16)
    names = [o.name for o in session.get_outputs()]
    feeds = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
             "position_ids": np.arange(len(prompt))[None],
             **{n: np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32) for n in info.past_names}}
    total = len(prompt)
    for step, reference in enumerate(expected):
        out = dict(zip(names, session.run(None, feeds)))
        np.testing.assert_allclose(out["logits"], reference, atol=1e-4, rtol=1e-4, err_msg=f"step {step}")
        assert out["present.0.key"].shape[2] == total
        if step == len(tokens):
            break
        total += 1
        feeds = {"input_ids": np.array([[tokens[step]]]), "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.array([[total - 1]]),
                 **{p: out[q] for p, q in zip(info.past_names, info.present_names)}}


def test_greedy_generation_is_token_identical_to_transformers_on_a_padded_batch(generation):
    model, info, session = generation
    prompts = [[2, 11, 12, 13, 14, 15, 16, 17, 18], [2, 40, 41], [2, 70, 71, 72, 73, 74]]
    ours = Generator(session, info).generate(prompts, max_new_tokens=20)
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for row, tokens in enumerate(generated[:, longest:].tolist()):
        expected = tokens[:tokens.index(info.eos[0])] if info.eos[0] in tokens else tokens
        assert ours[row] == expected, row
    alone = Generator(session, info).generate([prompts[1]], max_new_tokens=20)  # padding changes nothing
    assert alone[0] == ours[1]


def test_sampling_is_reproducible_with_a_seed_and_follows_the_options(generation):
    _, info, session = generation
    generator, prompt = Generator(session, info), [[2, 30, 31, 32]]
    sampled = Sampling(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7)
    first = generator.generate(prompt, max_new_tokens=12, sampling=sampled)
    assert first == generator.generate(prompt, max_new_tokens=12, sampling=sampled)
    others = {tuple(generator.generate(prompt, 12, Sampling(temperature=1.5, seed=s))[0]) for s in range(4)}
    assert len(others) > 1  # the seed decides
    top1 = generator.generate(prompt, max_new_tokens=12, sampling=Sampling(temperature=1.0, top_k=1, seed=3))
    assert top1 == generator.generate(prompt, max_new_tokens=12)  # top-k 1 is greedy


def test_streaming_yields_each_step_and_stops_at_a_stop_token(generation):
    _, info, session = generation
    generator = Generator(session, info)
    greedy = generator.generate([[2, 5, 6]], max_new_tokens=8)[0]
    steps = list(generator.stream([[2, 5, 6]], max_new_tokens=8))
    assert [int(s.tokens[0]) for s in steps][:len(greedy)] == greedy
    stopped = generator.generate([[2, 5, 6]], max_new_tokens=8, stop=[greedy[2]])[0]
    assert stopped == greedy[:greedy.index(greedy[2])]


@pytest.mark.parametrize("prompts, max_new, message", [
    ([[]], 4, "prompt 0 is empty"),
    ([[2, VOCAB + 5]], 4, f"token id {VOCAB + 5}, outside the vocabulary 0..{VOCAB - 1}"),
    ([[2] * 60], 10, "longer than the max length 64"),
    ([], 4, "no prompt given"),
])
def test_bad_requests_are_refused_with_the_reason(generation, prompts, max_new, message):
    _, info, session = generation
    with pytest.raises(GenerationError, match=message):
        Generator(session, info).generate(prompts, max_new_tokens=max_new)
