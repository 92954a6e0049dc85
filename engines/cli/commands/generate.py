"""``planforge generate BUNDLE PROMPT``: text from a decoder bundle, printed as it is produced."""

from __future__ import annotations

from pathlib import Path

import click

from engines.cli.console import console, print_json
from engines.cli.options import json_option


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Sample among the K likeliest "
              "tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Sample among the likeliest tokens whose probability reaches P.")
@click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Divide the logits of tokens already in the text (above 1: fewer repeats).")
@click.option("--seed", type=int, help="Seed of the sampling (the same seed gives the same text).")
@click.option("--ids", is_flag=True, help="PROMPT is token ids separated by commas, not text.")
@json_option
def generate(bundle, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ids, as_json):
    """Generate text from PROMPT with a decoder BUNDLE (greedy unless --temperature), printed as it comes."""
    from engines.runtime import load  # noqa: PLC0415 - per command: --help stays fast
    from engines.runtime.generate import Sampling  # noqa: PLC0415
    from engines.runtime.generate.text import Tokenizer  # noqa: PLC0415
    from foundation.errors import UsageError  # noqa: PLC0415

    sampling = Sampling(temperature, top_k, top_p, repetition_penalty, seed)
    tokenizer = None if ids else Tokenizer(bundle)
    try:
        prompt_ids = [int(t) for t in prompt.split(",")] if ids else tokenizer.encode(prompt)
    except ValueError:
        raise UsageError(f"--ids: expected token ids separated by commas, found {prompt!r}") from None
    with load(bundle) as runner:
        new: list[int] = []
        shown = ""
        for step in runner.stream([prompt_ids], max_new_tokens, sampling):
            if not step.emitted[0]:
                break
            new.append(int(step.tokens[0]))
            if tokenizer is not None and not as_json:
                text = tokenizer.decode(new)
                console.print(text[len(shown):], end="", markup=False, highlight=False, soft_wrap=True)
                shown = text
    if as_json:
        print_json({"prompt_tokens": len(prompt_ids), "new_tokens": new,
                    "text": tokenizer.decode(new) if tokenizer else None})
    elif tokenizer is None:
        console.print(",".join(map(str, new)))
    else:
        console.print()


COMMANDS = (generate,)
