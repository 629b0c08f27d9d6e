"""8-bit token embeddings for ONNX decoders, sharing the lm_head's 8-bit table where the model ties them.

A tied decoder (the rule in small models: SmolLM2, Qwen, Gemma) uses one matrix as the token-embedding table and
the output projection. qops quantizes the output projection to an 8-bit ``MatMulNBits`` (its error reaches the
logits unfiltered), whose weight blob is ``[vocab, hidden / block, block]`` uint8, one scale per block. Read row by
row, that is exactly the layout ``GatherBlockQuantized`` takes for 8-bit data gathered on axis 0 and quantized on
its last axis; so the embedding lookup reads the same initializer (stored once, as llama.cpp stores a tied
``token_embd``), with its scales (and the default zero point 128) reshaped to ``[vocab, blocks, 1]``, and the
gathered ``[batch, seq, blocks, block]`` reshaped to ``[batch, seq, hidden]``. An untied table gets its own 8-bit
blob of the same form. Lookups are exact dequantizations of those 8-bit rows."""

from __future__ import annotations

import numpy as np

from qops.errors import QopsError


def int8_embeddings(model, block: int, lm_head_node: str | None) -> str:
    """Replace the token-embedding ``Gather`` of ``model`` (in place) by an 8-bit ``GatherBlockQuantized``; with
    ``lm_head_node`` (the 8-bit lm_head ``MatMulNBits`` of a tied model), share its blob. Returns what was done."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and len(numpy_helper.to_array(inits[n.input[0]]).shape) == 2), None)
    if gather is None:
        raise QopsError("The decoder has no constant token-embedding Gather to quantize to 8 bits.",
                        "use embeddings int4, or op_types without Gather (FP32 embeddings).")
    table = numpy_helper.to_array(inits[gather.input[0]])
    vocab, hidden = table.shape
    head = next((n for n in model.graph.node if n.name == lm_head_node and n.op_type == "MatMulNBits"), None)
    shared = False
    if head is not None:
        attrs = {a.name: a.i for a in head.attribute}
        blob = numpy_helper.to_array(inits[head.input[1]])
        shared = attrs.get("bits") == 8 and attrs.get("N") == vocab and attrs.get("K") == hidden and blob.ndim == 3
    if shared:
        data, block = head.input[1], attrs["block_size"]
        scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, -1, 1)
        zp = numpy_helper.to_array(inits[head.input[3]]).reshape(vocab, -1, 1) \
            if len(head.input) > 3 and head.input[3] else np.full(scales.shape, 128, np.uint8)
        what = f"int8, blocks of {block}, sharing the lm_head's 8-bit table (tied: stored once)"
    else:
        if hidden % block:
            raise QopsError(f"The embedding width {hidden} is not a multiple of the block size {block}.",
                            "set block_size to a power of two that divides it.")
        g = table.reshape(vocab, hidden // block, block).astype(np.float64)
        s = np.abs(g).max(-1) / 127
        s = np.where(s == 0, 1.0, s)
        codes = (np.clip(np.round(g / s[..., None]), -128, 127) + 128).astype(np.uint8)
        data = gather.input[0] + "_Q8"
        model.graph.initializer.append(numpy_helper.from_array(codes, data))
        scales, zp = s.reshape(vocab, -1, 1).astype(np.float32), np.full((vocab, hidden // block, 1), 128, np.uint8)
        what = f"int8 symmetric, blocks of {block} (GatherBlockQuantized)"
    base = gather.name or gather.output[0]
    sc, z, shape = base + "_q8_scales", base + "_q8_zero_points", base + "_q8_shape"
    model.graph.initializer.extend([numpy_helper.from_array(scales.astype(np.float32), sc),
                                    numpy_helper.from_array(zp.astype(np.uint8), z),
                                    numpy_helper.from_array(np.array([0, 0, hidden], np.int64), shape)])
    blocks = base + "_q8_blocks"
    nodes = [helper.make_node("GatherBlockQuantized", [data, gather.input[1], sc, z], [blocks], name=base + "_Q8",
                              domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=block, bits=8),
             helper.make_node("Reshape", [blocks, shape], [gather.output[0]], name=base + "_Q8_reshape")]
    i = list(model.graph.node).index(gather)
    old_table = gather.input[0]
    model.graph.node.remove(gather)
    for n in reversed(nodes):
        model.graph.node.insert(i, n)
    if not any(old_table in n.input for n in model.graph.node):
        model.graph.initializer.remove(inits[old_table])
    return what
