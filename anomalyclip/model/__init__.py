"""The AnomalyCLIP model, in parts a reader can hold:

- :mod:`.module`: the ``nn.Module`` (config, tensor API ``preprocess`` -> ``forward``, options);
- :mod:`.factory`: building from a CLIP, a backbone reference or an official checkpoint;
- :mod:`.persistence`: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``;
- :mod:`.api`: the image-level methods (a mixin), delegating to the modules below;
- :mod:`.fewshot`: collecting few-shot references;
- :mod:`.predict`: batched and tiled prediction, calibration;
- :mod:`.training`: ``finetune`` in place.
"""

from ..config import CONFIG_NAME, WEIGHTS_NAME
from .module import AnomalyCLIP

__all__ = ["AnomalyCLIP", "CONFIG_NAME", "WEIGHTS_NAME"]
