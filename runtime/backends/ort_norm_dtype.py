"""One rewrite of ONNX Runtime's fused UNet graphs (`ort_cuda.UNET_FUSIONS`): its GroupNorm ops
read and write the activations' own dtype instead of a float32 copy.

The exported fp16 graphs keep every group norm in float32, as the torch modules do
(`GroupNorm32`: the input cast up, normalised, cast back): a Cast to float32 before the norm, one
back after. Once ONNX Runtime's optimizer has fused each norm into its GroupNorm op, that round
trip only moves memory: the op's CUDA kernel sums in float32 for fp16 inputs as well, and its
float32 output was rounded to fp16 by the Cast after it anyway. So a GroupNorm fed by a Cast to
float32 (directly, or through the Transpose into channels-last the fusion adds) reads the Cast's
input instead, provided every reader of the norm's output is a Cast (directly, or through a
Transpose back to channels-first), which then gives what follows the type it had before. A norm
whose float32 output feeds float32 arithmetic (the decoder's scale-and-shift) keeps its Casts.
Casts left without readers are removed.
"""

from __future__ import annotations

from collections import defaultdict

FLOAT = 1  # onnx.TensorProto.FLOAT


def int_attribute(node, name: str) -> int | None:
    """The integer attribute `name` of an onnx node, None where it has none."""
    return next((a.i for a in node.attribute if a.name == name), None)


def _cast_to(node) -> int | None:
    """The `to` of a Cast node, else None."""
    return int_attribute(node, "to") if node.op_type == "Cast" else None


def links(graph) -> tuple[dict, defaultdict]:
    """The node that writes each value of `graph`, and the nodes that read it (a list, empty for none)."""
    producer = {out: node for node in graph.node for out in node.output}
    readers: defaultdict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return producer, readers


def norms_in_activation_dtype(graph) -> int:
    """Rewrite `graph` (an onnx GraphProto, in place) as the module docstring says; the number of
    GroupNorm ops that now read their input's own dtype."""
    producer, readers = links(graph)
    outputs = {o.name for o in graph.output}

    def cast_only(name: str, through_transpose: bool) -> bool:
        """Whether every reader of `name` is a Cast (or, once, a Transpose whose readers all are)."""
        after = readers[name]
        return name not in outputs and bool(after) and all(
            _cast_to(r) is not None
            or (through_transpose and r.op_type == "Transpose" and cast_only(r.output[0], False))
            for r in after)

    changed = 0
    for norm in [n for n in graph.node if n.op_type == "GroupNorm"]:
        if not cast_only(norm.output[0], True):
            continue
        feeder, link = producer.get(norm.input[0]), norm
        if feeder is not None and feeder.op_type == "Transpose" and len(readers[feeder.output[0]]) == 1:
            feeder, link = producer.get(feeder.input[0]), feeder
        if feeder is None or _cast_to(feeder) != FLOAT:
            continue
        readers[feeder.output[0]].remove(link)
        link.input[0] = feeder.input[0]
        readers[feeder.input[0]].append(link)
        changed += 1
    unread = [n for n in graph.node if n.op_type == "Cast" and not readers[n.output[0]] and n.output[0] not in outputs]
    for node in unread:
        graph.node.remove(node)
    return changed
