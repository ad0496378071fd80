"""Converting checkpoints larger than a second copy would fit in memory.

The pattern: build the target model with its parameters on the meta device (`init_empty_model`: no memory), rename
the source tensors by popping them from the source dict (`state_dict_utils.rename_keys`), and let
`state_dict_utils.load_converted_state_dict` adopt them as the model's parameters as they are (`assign=True`, in the
checkpoint's dtype). Each parameter is the source tensor itself, so the only full copy of the weights is the one read
from the file (memory-mapped when `load_original_checkpoint(..., mmap=True)`), and `streamed_save` writes it shard by
shard, casting each tensor to the saved dtype as its shard is written: peak memory about one shard plus the largest
tensor.
"""

from torch import nn


def init_empty_model(model_cls: type[nn.Module], **config) -> nn.Module:
    """
    `model_cls(**config)` with every parameter on the meta device (shape and dtype only, no storage).

    Buffers (e.g. fixed sin-cos position tables that are not in the state dict) are created normally, so after all
    parameters are loaded with `load_converted_state_dict` the model is complete.
    """
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a core dependency
        raise ImportError("Low-memory conversion needs `accelerate` (pip install accelerate).") from None
    with init_empty_weights(include_buffers=False):
        return model_cls(**config)
