"""Child process of :func:`qops.llm.gguf.convert_hf`: run llama.cpp's ``convert_hf_to_gguf.py`` with its own
``gguf-py``, arguments as the script takes them.

One addition: llama.cpp recognises a byte-level BPE tokenizer by the hash of how it splits a test string, a list
kept for released models. A tokenizer trained by a team (the example's) is not in that list although its
pre-tokenizer is GPT-2's byte-level split, which llama.cpp implements as ``gpt-2``; for such a tokenizer (a single
``ByteLevel`` pre-tokenizer with GPT-2's regex, no prefix space) the converter is told ``gpt-2``. Every other
unknown tokenizer fails as the converter says. The tests check that llama.cpp then tokenizes text as the
checkpoint's tokenizer does.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path


def byte_level_gpt2(model_dir: Path) -> bool:
    tok = model_dir / "tokenizer.json"
    if not tok.is_file():
        return False
    pre = json.loads(tok.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def main(argv: list[str]) -> None:
    d = Path(os.environ["QOPS_LLAMA_CPP_DIR"])
    script = d / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(d), str(d / "gguf-py")]
    from conversion import base  # llama.cpp's converter package

    known = base.TextModel.get_vocab_base_pre

    def vocab_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if byte_level_gpt2(Path(self.dir_model)):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = vocab_pre
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
