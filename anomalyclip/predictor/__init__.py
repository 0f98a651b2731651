"""The predictor core shared by every runtime (torch model, ONNX runtime, Ray actor). Torch-free.

- :mod:`.thresholds`: the one threshold resolution (what ``predict`` applies) and the decision
  mode a threshold belongs to;
- :mod:`.stream`: the streaming prediction loop (one ordered prefetch pipeline over a possibly
  lazy stream of images, batching, unreadable images recorded or raised) over a small
  :class:`~.stream.Backend` interface that each runtime implements.
"""

from .stream import Backend, PendingBatch, expand_inputs, predict_stream
from .thresholds import DecisionMode, resolve_thresholds

__all__ = ["Backend", "PendingBatch", "DecisionMode", "expand_inputs", "predict_stream", "resolve_thresholds"]
