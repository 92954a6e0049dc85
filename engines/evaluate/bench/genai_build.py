"""onnxruntime-genai's model builder on a Hugging Face directory, for ``bench-llm``'s peer:
``python genai_build.py HF_DIR OUT PRECISION`` in the venv that has onnxruntime-genai (standard library and
the builder only; nothing of planforge).

onnxruntime-genai 0.18's builder reads a Gemma 3 config the transformers-4 way: ``rope_parameters["rope_type"]``
and ``rope_local_base_freq``. transformers 5 nests ``rope_parameters`` per layer type and has no
``rope_local_base_freq``, and the builder stops with ``KeyError: 'rope_type'``. This gives the config object
both: the nested entries transformers reads and the flat keys (the global rope's) the builder reads, plus the
local base frequency. Nothing else is changed; the builder runs with its CPU defaults for the precision
(int4: RTN, block 32, symmetric, accuracy level 4). ``planforge_peer.json`` in OUT records how it was built.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def _patch_config() -> None:
    import transformers  # noqa: PLC0415 - the peer venv's

    original = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        config = original(cls, *args, **kwargs)
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
            config.rope_parameters = {**rope, **rope["full_attention"]}
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        return config

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)


def main(argv: list[str]) -> int:
    source, out, precision = argv
    _patch_config()
    Path(out).mkdir(parents=True, exist_ok=True)
    sys.argv = ["builder", "-i", source, "-o", out, "-p", precision, "-e", "cpu", "-c", str(Path(out) / ".cache")]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    record = {"precision": precision, "source": source, "builder": "onnxruntime_genai.models.builder 0.18, CPU "
              "defaults", "config_patch": "rope_parameters given the flat global keys and rope_local_base_freq"}
    (Path(out) / "planforge_peer.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
