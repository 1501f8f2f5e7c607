"""TorchServe handler for the peer benchmark: efficientnet_lite0 v0 behind `BaseHandler`.

Runs inside TorchServe's Python backend (its own virtual environment), never in ours: it
imports `ts` and the sibling `preprocess` module that the archive ships as an extra file.

- Model: the serialized file of the archive. `BaseHandler.initialize` loads it the idiomatic
  way: a `.onnx` file into an ONNX Runtime session (`setup_ort_session`), a `.pt` file with
  `torch.jit.load`. `setup_ort_session` gives a session as many intra-op threads as the machine
  has cores, which cannot be set from the configuration, so the session is made again with
  `handler.threads` of the model's YAML config (intra-op threads, one inter-op thread,
  full graph optimisation: the options our `training.inference.OnnxModule` uses); for
  TorchScript, `torch.set_num_threads(handler.threads)`. That is how the benchmark tries
  workers x threads layouts.
- Input: each request's multipart field `files` (the body our load generator posts; TorchServe's
  frontend hands form fields to the handler by name), else the raw body (`data`/`body`).
- Work per request: the same decode (JPEG draft mode) and preprocessing as our service
  (`preprocess.py`), a forward pass on the batch TorchServe hands over, softmax, and the top 5
  labels with scores: the shape of our answer's predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import preprocess  # the archive's extra file
import torch
from ts.torch_handler.base_handler import BaseHandler


class VisionloopHandler(BaseHandler):
    model: Any

    def initialize(self, context: Any) -> None:
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        threads = int(config.get("threads", 1))
        torch.set_num_threads(threads)
        super().initialize(context)
        self.onnx = not isinstance(self.model, torch.nn.Module)
        if self.onnx:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.model = ort.InferenceSession(self.model_pt_path, opts,
                                              providers=["CPUExecutionProvider"])
            self.input_name = self.model.get_inputs()[0].name
        model_dir = context.system_properties.get("model_dir")
        self.classes = preprocess.load_classes(Path(model_dir))

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        images = []
        for row in data:
            raw = row.get("files") or row.get("data") or row.get("body")
            images.append(preprocess.to_tensor(preprocess.decode(raw)))
        return torch.stack(images)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.onnx:
            out = self.model.run(None, {self.input_name: data.contiguous().numpy()})[0]
            return torch.from_numpy(out)
        with torch.inference_mode():
            logits: torch.Tensor = self.model(data)
            return logits

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        return [{"predictions": p} for p in preprocess.top_k(data.softmax(1), self.classes)]
