"""Where an ONNX model's bytes go: one ``model.onnx``, with every weight in ``model.onnx.data`` beside it once the
model is larger than protobuf's 2 GiB limit. Shared by the exporter and the fp16 converter (kept out of both so that
neither imports the other).
"""

from __future__ import annotations

from pathlib import Path

import onnx

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PROTOBUF_LIMIT = 2**31 - 2**26  # 2 GiB minus room for the graph itself: above this, weights go external


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Save ``model`` as ``path``, with all weights in one ``model.onnx.data`` beside it above 2 GiB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    external = size > PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE if external else None, size_threshold=1024)
    return path


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: the fp16 block list and int8's exclusion lists are by node name, and the
    exporters may leave names empty or repeated."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}_named"
        seen.add(node.name)
