"""SSD's normalisation, scoring, box decoding and NMS moved into the ONNX graph (``host_ops="graph"``).

On a 2-core host the shared numpy path costs ~0.5 ms of pre-processing and ~0.6 ms of decode + NMS
per 640x384 frame (RESULTS.md, ``engine``), most of it per-call overhead of small array ops that
do not shrink when pruning shrinks the graph. Deployments on TensorRT fold the same work into the
engine (the normalisation into the first layer's input, NMS as ``INMSLayer``/EfficientNMS); this
module does the equivalent with standard ONNX ops, so ONNX Runtime runs it in its own kernels:

* input either ``frames_u8`` [N, H, W, 3] uint8 (the frame resized on the host in uint8, nothing
  else; the runtime's default), which ``Transpose -> Cast -> 1x1 depthwise Conv`` normalises to
  ``(x / 255 - mean) / std``, or with ``normalise=False`` the host's normalised canvas ``images``
  [N, 3, H, W] float32 (``resize="float32"``: OpenCV's one-call resize + normalise, torchvision's
  pixels exactly). Paired on 2 cores (RESULTS.md, ``engine``) the uint8 form's whole frame is the
  faster of the two: the float blob costs the host more than the three nodes cost the graph;
* ``Softmax`` over the classes, torchvision's per-class top-k as a ``TopK`` whose k-th value masks
  the rest, ``BoxCoder.decode_single`` + ``clip_boxes_to_image`` on every anchor (float32, the same
  arithmetic as :mod:`deploy.runtimes.postprocess`), and one ``NonMaxSuppression`` over
  (image, class) with the score threshold;
* outputs the kept ``det_index`` [K, 3] (image, foreground class, anchor), ``det_score`` [K] and
  ``det_box`` [K, 4] (canvas x1, y1, x2, y2); the host keeps each image's best ``detections_per_img``.

The score threshold, IoU threshold, top-k and per-class cap are graph *inputs*, fed per call
from the skeleton's knobs, so changing ``score_thresh`` after opening works as on the host path.
``max_output_boxes_per_class = detections_per_img`` is exact: a class whose kept boxes already fill
the image's quota outranks anything further down that class.

Differences from torchvision's ``postprocess_detections`` (checked by ``tests/test_fused_ends.py``):
candidates tied exactly at a class's k-th score are all kept (torchvision keeps an arbitrary k of
them); with ``frames_u8`` the canvas comes from the uint8 resize (``resize="uint8"`` on the host path).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: names of the fused graph's extra inputs and outputs
FRAMES_INPUT = "frames_u8"
KNOB_INPUTS = ("score_thresh", "iou_thresh", "topk", "per_class")
FUSED_OUTPUTS = ("det_index", "det_score", "det_box")


def fuse_ssd_ends(proto: Any, *, mean: tuple[float, ...], std: tuple[float, ...], anchors: np.ndarray,
                  canvas: tuple[int, int], weights: tuple[float, float, float, float], bbox_xform_clip: float,
                  input_name: str = "images", normalise: bool = True) -> Any:
    """A copy of the SSD core graph ``proto`` with the pre- and post-processing inside (module doc).

    ``anchors`` (A, 4) float32 canvas x1, y1, x2, y2 (``Postprocessor.anchors(1)[0]``); ``canvas``
    (height, width) the boxes are clipped to. ``normalise=False`` keeps the graph's own input (the
    normalised float canvas, as the host path prepares it) and folds only the post-processing.
    The resize stays on the host: ONNX Runtime's uint8 ``Resize`` took 0.8 ms per 640x384 frame on 2
    threads here, ``cv2.resize`` 0.16 ms on one.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    outs = {o.name for o in g.output}
    if not {"bbox_regression", "cls_logits"} <= outs or [i.name for i in g.input] != [input_name]:
        raise ValueError(f"fuse_ssd_ends: expected an SSD core graph (input {input_name!r}, outputs "
                         f"bbox_regression and cls_logits); got inputs {[i.name for i in g.input]}, outputs {sorted(outs)}")
    a = np.asarray(anchors, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"anchors must be (A, 4); got {a.shape}")
    size = a[:, 2:] - a[:, :2]
    ctr = a[:, :2] + np.float32(0.5) * size
    h, w = canvas
    wx, wy, ww, wh = (float(v) for v in weights)

    def const(name: str, value: np.ndarray) -> str:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    # NonMaxSuppression (opset 11), GreaterOrEqual (12), Split/ReduceSum with sizes/axes as inputs (13)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 13:
            imp.version = 13
    opset = max(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32).reshape(1, 3, 1, 1)
    shift = (-np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)).astype(np.float32).reshape(1, 3, 1, 1)
    nodes = [
        # pre-processing: uint8 NHWC -> normalised float NCHW, feeding the old input's consumers. The
        # transpose moves bytes (4x fewer than floats); x * scale + shift per channel is a 1x1
        # depthwise convolution, one pass in ORT's blocked layout (Cast, Transpose, Mul, Add on floats
        # took 0.36 ms per 320x320 frame, measured with ORT's profiler on one thread). Folding the
        # scale into the first conv's weights and leaving a Sub of the mean was slower still, paired
        # over whole frames: 0.09-0.12 ms more per frame, with the mean broadcast or full-size
        helper.make_node("Transpose", [FRAMES_INPUT], ["_f_nchw_u8"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["_f_nchw_u8"], ["_f_nchw"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["_f_nchw", const("_f_scale", scale.reshape(3, 1, 1, 1)),
                                  const("_f_shift", shift.reshape(3))], [input_name], group=3, kernel_shape=[1, 1]),
    ]
    post = [
        # scores: softmax over classes, foreground only, laid out [N, C-1, A] as NMS wants them
        helper.make_node("Softmax", ["cls_logits"], ["_p_prob"], axis=-1),
        helper.make_node("Slice", ["_p_prob", const("_p_one", np.array([1], np.int64)),
                                   const("_p_big", np.array([1 << 30], np.int64)),
                                   const("_p_axis2", np.array([2], np.int64))], ["_p_fg"]),
        helper.make_node("Transpose", ["_p_fg"], ["_p_scores"], perm=[0, 2, 1]),
        # torchvision's per-class top-k: scores under the class's k-th best drop to 0. Only where some
        # class has more than k candidates over the threshold can it change anything, and a TopK over
        # every anchor costs ~0.45 ms here: it runs in an If branch, taken only then.
        helper.make_node("Greater", ["_p_scores", "score_thresh"], ["_p_over"]),
        # counted in float32 (exact up to 2^24 anchors): its cast and sum vectorise, int64's took 3x longer
        helper.make_node("Cast", ["_p_over"], ["_p_over_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["_p_over_f", "_p_axis2"], ["_p_per_class"], keepdims=0),
        helper.make_node("ReduceMax", ["_p_per_class"], ["_p_most"], keepdims=0),
        helper.make_node("Cast", ["topk"], ["_p_topk_f"], to=TensorProto.FLOAT),
        helper.make_node("Squeeze", ["_p_topk_f"], ["_p_topk_scalar"]),
        helper.make_node("Greater", ["_p_most", "_p_topk_scalar"], ["_p_cut"]),
        helper.make_node("If", ["_p_cut"], ["_p_nms_scores"], then_branch=_topk_branch(opset),
                         else_branch=_identity_branch()),
        # BoxCoder.decode_single (float32) and clip_boxes_to_image. Every constant has the full
        # (A, k) shape: ORT broadcasts a short last axis (a [2] or [4] vector) element by element,
        # ~100 us per op here, against ~10 for same-shape operands. x / w is x * (1 / w): at most an
        # ulp from torchvision's quotient (boxes agree to ~1e-5 px).
        helper.make_node("Mul", ["bbox_regression", const("_b_inv_w", np.tile(
            np.array([1 / wx, 1 / wy, 1 / ww, 1 / wh], np.float32), (a.shape[0], 1)))], ["_b_rel"]),
        helper.make_node("Split", ["_b_rel", const("_b_split", np.array([2, 2], np.int64))],
                         ["_b_ctr_rel", "_b_size_rel"], axis=2),
        helper.make_node("Min", ["_b_size_rel", const("_b_clip", np.array(bbox_xform_clip, np.float32))],
                         ["_b_size_clip"]),
        helper.make_node("Mul", ["_b_ctr_rel", const("_b_asize", size)], ["_b_ctr_off"]),
        helper.make_node("Add", ["_b_ctr_off", const("_b_actr", ctr)], ["_b_ctr"]),
        helper.make_node("Exp", ["_b_size_clip"], ["_b_exp"]),
        helper.make_node("Mul", ["_b_exp", "_b_asize"], ["_b_wh"]),
        helper.make_node("Mul", ["_b_wh", const("_b_half", np.array(0.5, np.float32))], ["_b_halfwh"]),
        helper.make_node("Sub", ["_b_ctr", "_b_halfwh"], ["_b_lo"]),
        helper.make_node("Add", ["_b_ctr", "_b_halfwh"], ["_b_hi"]),
        helper.make_node("Concat", ["_b_lo", "_b_hi"], ["_b_raw"], axis=2),
        helper.make_node("Max", ["_b_raw", const("_p_zero", np.zeros((), np.float32))], ["_b_pos"]),
        helper.make_node("Min", ["_b_pos", const("_b_canvas", np.tile(np.array([w, h, w, h], np.float32),
                                                                       (a.shape[0], 1)))], ["_b_boxes"]),
        # one NMS over every (image, class); its score threshold keeps scores strictly above it
        helper.make_node("NonMaxSuppression", ["_b_boxes", "_p_nms_scores", "per_class", "iou_thresh", "score_thresh"],
                         ["det_index"], center_point_box=0),
        helper.make_node("GatherND", ["_p_scores", "det_index"], ["det_score"]),
        helper.make_node("Gather", ["det_index", const("_d_img_anchor", np.array([0, 2], np.int64))],
                         ["_d_img_anchor_idx"], axis=1),
        helper.make_node("GatherND", ["_b_boxes", "_d_img_anchor_idx"], ["det_box"]),
    ]
    if not normalise:
        nodes = []
        for name in ("_f_scale", "_f_shift"):  # the normalisation's constants: nothing reads them
            g.initializer.remove(next(t for t in g.initializer if t.name == name))
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes + post)
    H, W = (int(d.dim_value) for d in g.input[0].type.tensor_type.shape.dim[2:4])
    batch = g.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or batch.dim_value or "batch"
    image_input = (helper.make_tensor_value_info(FRAMES_INPUT, TensorProto.UINT8, [batch_dim, H, W, 3]) if normalise
                   else helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch_dim, 3, H, W]))
    del g.input[:]
    g.input.extend([
        image_input,
        helper.make_tensor_value_info("score_thresh", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("iou_thresh", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("topk", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("per_class", TensorProto.INT64, [1]),
    ])
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("det_index", TensorProto.INT64, ["k", 3]),
        helper.make_tensor_value_info("det_score", TensorProto.FLOAT, ["k"]),
        helper.make_tensor_value_info("det_box", TensorProto.FLOAT, ["k", 4]),
    ])
    onnx.checker.check_model(model)
    return model


def _topk_branch(opset: int) -> Any:
    """``_p_scores`` with every score under its class's ``topk``-th best set to 0 (outer-scope names)."""
    from onnx import TensorProto, helper

    nodes = [
        # unsorted: only the k-th value is needed (the smallest of the k kept)
        helper.make_node("TopK", ["_p_scores", "topk"], ["_t_val", "_t_idx"], axis=-1, largest=1, sorted=0),
        # the reduction's axes became an input in opset 18
        helper.make_node("ReduceMin", ["_t_val", "_t_axes"], ["_t_kth"], keepdims=1) if opset >= 18 else
        helper.make_node("ReduceMin", ["_t_val"], ["_t_kth"], keepdims=1, axes=[2]),
        helper.make_node("GreaterOrEqual", ["_p_scores", "_t_kth"], ["_t_keep"]),
        helper.make_node("Where", ["_t_keep", "_p_scores", "_t_zero"], ["_t_out"]),
    ]
    inits = [helper.make_tensor("_t_axes", TensorProto.INT64, [1], [2]),
             helper.make_tensor("_t_zero", TensorProto.FLOAT, [], [0.0])]
    return helper.make_graph(nodes, "topk_mask", [], [helper.make_tensor_value_info("_t_out", TensorProto.FLOAT, None)],
                             initializer=inits)


def _identity_branch() -> Any:
    from onnx import TensorProto, helper

    return helper.make_graph([helper.make_node("Identity", ["_p_scores"], ["_i_out"])], "no_topk", [],
                             [helper.make_tensor_value_info("_i_out", TensorProto.FLOAT, None)])


def knob_feeds(score_thresh: float, nms_thresh: float, topk_candidates: int, detections_per_img: int,
               anchors: int) -> dict[str, np.ndarray]:
    """The fused graph's knob inputs for one call (``topk`` clamped to the anchor count, as torchvision's ``min``)."""
    return {
        "score_thresh": np.array([score_thresh], np.float32),
        "iou_thresh": np.array([nms_thresh], np.float32),
        "topk": np.array([max(1, min(int(topk_candidates), int(anchors)))], np.int64),
        "per_class": np.array([max(0, int(detections_per_img))], np.int64),
    }


def split_detections(index: np.ndarray, score: np.ndarray, box: np.ndarray, n: int,
                     detections_per_img: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The fused outputs -> per image (boxes, scores, labels) on the canvas, best first, at most
    ``detections_per_img`` each (labels 1-based: class 0 is the background)."""
    out = []
    for i in range(n):
        rows = np.flatnonzero(index[:, 0] == i) if n > 1 else np.arange(index.shape[0])
        # best first; a stable sort keeps NMS's own order between equal scores
        order = rows[np.argsort(-score[rows], kind="stable")[:detections_per_img]]
        out.append((box[order], score[order], index[order, 1] + 1))
    return out
