"""Child process of :func:`qops.llm.evaluate.peak_memory`: load a model, prefill a prompt, decode; print the peak
resident memory above the footprint before loading, as JSON on the last line of stdout."""

from __future__ import annotations

import json
import sys

from qops.llm.runner import open_decoder
from qops.llm.source import LlmInfo


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    import numpy as np

    args = json.loads(sys.stdin.read())

    info = LlmInfo(**args["info"])
    if args["path"].endswith(".gguf"):
        import llama_cpp  # noqa: F401 - counted in the baseline, not in the model's memory
    elif not args["path"].endswith(".onnx"):
        import torch  # noqa: F401 - counted in the baseline, not in the model's memory
    import onnxruntime  # noqa: F401

    try:  # reset the high-water mark: imports' transient peaks are not the model's
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_bytes()
    # greedy decoding needs the last position's logits only (llama.cpp then computes no others, as a server)
    dec = open_decoder(args["path"], info, threads=1, recipe=args.get("recipe"), all_logits=False)
    tok = int(np.argmax(dec.prefill(np.asarray(args["prompt"], np.int64))[-1]))
    for _ in range(args["new_tokens"]):
        tok = int(np.argmax(dec.step(tok)))
    peak = _hwm_bytes()
    print(json.dumps({"peak_bytes": max(peak - base, 0), "baseline_bytes": base}))


if __name__ == "__main__":
    main()
