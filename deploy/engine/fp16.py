"""FP16 ONNX rewrite for strongly typed TensorRT (11.x): fp16 weights and compute, fp32 I/O.

``onnxconverter-common`` is not a dependency, so this does the small part we need with ``onnx``:
float32 initializers / Constant tensors / Cast targets become float16, a Cast to fp16 follows
each float input and a Cast back to fp32 precedes each float output (callers keep feeding and
reading fp32). Tensors whose schema demands float32 (Resize ``roi``/``scales``) stay fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# (op_type, input index) slots that only accept float32 in the ONNX schema
_FP32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def convert_fp16(src: str | Path, dest: str | Path) -> Path:
    """Write the fp16 form of ``src`` to ``dest`` (not atomic: callers pass a temporary path)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(src))
    g = proto.graph
    keep_fp32 = {n.input[i] for n in g.node for (op, i) in _FP32_ONLY_INPUTS if n.op_type == op and len(n.input) > i}
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep_fp32:
            arr = numpy_helper.to_array(init)
            if np.abs(arr).max(initial=0) > 65504:
                log.warning("initializer %s exceeds the fp16 range: values clipped", init.name)
            init.CopyFrom(numpy_helper.from_array(np.clip(arr, -65504, 65504).astype(np.float16), init.name))
    for node in g.node:
        if node.op_type == "Constant" and node.output[0] not in keep_fp32:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT and node.output[0] not in keep_fp32:
                    a.i = TensorProto.FLOAT16
    new_nodes = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            cast_name = f"{inp.name}__fp16"
            for node in g.node:
                node.input[:] = [cast_name if x == inp.name else x for x in node.input]
            new_nodes.append(helper.make_node("Cast", [inp.name], [cast_name], to=TensorProto.FLOAT16, name=cast_name))
    tail = []
    for out in g.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{out.name}__fp16"
            for node in g.node:
                node.output[:] = [inner if x == out.name else x for x in node.output]
                node.input[:] = [inner if x == out.name else x for x in node.input]
            tail.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{out.name}__fp32"))
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # stale fp32 annotations; shape inference redoes them
    proto = onnx.shape_inference.infer_shapes(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dest))
    return Path(dest)
