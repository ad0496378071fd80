"""Converting original research checkpoints into diffusers folders (`diffmoe convert ...`).

Each family's converter is its own module (`convert_<family>.py`, declaring a `FamilyConverter`), found through the
family registry (`diffmoe_hf.families`); nothing here lists the families.
"""

from .checkpoint_io import CheckpointError, LoadedCheckpoint, load_original_checkpoint
from .convert import build_pipeline, convert_checkpoint, family_options
from .family_converter import FamilyConverter
from .hub_folder import apply_hub_layout, push_folder_to_hub, recover_interrupted_save, save_folder_atomically
from .low_memory import init_empty_model
