"""CNN lens-finding models: architectures, the checkpoint format and the bundled-model registry.

>>> import numpy as np
>>> from lenscan.models import load_model, DEFAULT_MODEL
>>> model = load_model(DEFAULT_MODEL)
>>> raw_stamps = np.zeros((4, len(model.meta.bands), 48, 48), np.float32)
>>> probs = model.score_mean(model.normalise(raw_stamps))  # ensemble-mean probability
>>> probs.shape
torch.Size([4])
"""

from lenscan.models.architectures import (
    JacobsCNN,
    ResNetSmall,
    create_model,
    list_architectures,
    register_model,
)
from lenscan.models.checkpoint import (
    FORMAT_VERSION,
    LensModel,
    ModelMeta,
    build_members,
    check_compatible,
    combine_models,
    load_model,
    read_model_meta,
    save_model,
)
from lenscan.models.registry import (
    BUNDLED_DIR,
    DEFAULT_MODEL,
    list_bundled_models,
    resolve_model_files,
)

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "JacobsCNN",
    "LensModel",
    "ModelMeta",
    "ResNetSmall",
    "build_members",
    "check_compatible",
    "combine_models",
    "create_model",
    "list_architectures",
    "list_bundled_models",
    "load_model",
    "read_model_meta",
    "register_model",
    "resolve_model_files",
    "save_model",
]
