"""Converting original research checkpoints into diffusers folders (`diffmoe convert ...`)."""

from .checkpoint_io import CheckpointError, LoadedCheckpoint, load_original_checkpoint
from .convert import CONVERTERS, build_pipeline, convert_checkpoint, family_options
from .convert_dit_moe import build_dit_moe_transformer, convert_dit_moe, dit_moe_config
from .convert_dsmoe import build_dsmoe_transformer, convert_dsmoe, dsmoe_config_from_params
from .convert_dynamic_token_moe import build_dynamic_token_moe_transformer, convert_dynamic_token_moe
from .convert_jit import build_jit_transformer, convert_jit, jit_config_from_kwargs
from .convert_spatial_temporal_moe import build_spatial_temporal_moe_transformer, spatial_temporal_moe_config
from .hub_folder import apply_hub_layout, push_folder_to_hub, recover_interrupted_save, save_folder_atomically
from .low_memory import init_empty_model
