"""BentoML service for the peer benchmark: efficientnet_lite0 v0 with adaptive batching.

Served by `bentoml serve bentoml_service:VisionloopPeer` from a folder holding this file,
`preprocess.py` and the model files, in BentoML's own virtual environment (never ours).

The idiomatic BentoML shape: a `@bentoml.service` class (as many workers as the machine has
cores, each with the model loaded once in `__init__`) and one `@bentoml.api(batchable=True)`
method, so BentoML's adaptive batcher gathers concurrent requests into one call
(`max_batch_size` 16, the most clients the benchmark runs; `max_latency_ms` BentoML's default,
60 s, which also tunes its batcher's wait: a tighter one would answer 503 under overload
rather than queue, which our service does not do either). The method takes
`files: list[PIL.Image.Image]`: BentoML reads a multipart body's `files` field into PIL
images, so our load generator's request (POST /v1/predict, multipart field `files`, one JPEG)
is accepted unchanged (`route` sets the path). BentoML opens the image without decoding it,
so the same JPEG draft-mode decode and preprocessing as our service follow (`preprocess.py`).

Model files (VISIONLOOP_PEER_MODEL_DIR, default: this folder): `model.onnx` -> ONNX Runtime
(intra-op threads VISIONLOOP_PEER_THREADS, one inter-op thread, full graph optimisation, as our
`OnnxModule`), else `model.pt` (TorchScript) with torch; `classes.json` for the labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
import preprocess  # beside this file where it is served
import torch
from PIL.Image import Image

WORKERS = int(os.environ.get("VISIONLOOP_PEER_WORKERS", os.cpu_count() or 1))
THREADS = int(os.environ.get("VISIONLOOP_PEER_THREADS", "1"))
MAX_BATCH = int(os.environ.get("VISIONLOOP_PEER_MAX_BATCH", "16"))
MAX_LATENCY_MS = int(os.environ.get("VISIONLOOP_PEER_MAX_LATENCY_MS", "60000"))


@bentoml.service(workers=WORKERS, traffic={"timeout": 60})
class VisionloopPeer:
    def __init__(self) -> None:
        folder = Path(os.environ.get("VISIONLOOP_PEER_MODEL_DIR", Path(__file__).parent))
        torch.set_num_threads(THREADS)
        self.classes = preprocess.load_classes(folder)
        self.session: Any = None
        if (folder / "model.onnx").exists():
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = THREADS
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.session = ort.InferenceSession(str(folder / "model.onnx"), opts,
                                                providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        else:
            self.model = torch.jit.load(str(folder / "model.pt"), map_location="cpu").eval()

    @bentoml.api(route="/v1/predict", batchable=True, max_batch_size=MAX_BATCH,
                 max_latency_ms=MAX_LATENCY_MS)
    def predict(self, files: list[Image]) -> list[dict[str, Any]]:
        x = torch.stack([preprocess.to_tensor(preprocess.from_opened(f)) for f in files])
        if self.session is not None:
            logits = torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
        else:
            with torch.inference_mode():
                logits = self.model(x)
        return [{"predictions": p} for p in preprocess.top_k(logits.softmax(1), self.classes)]
