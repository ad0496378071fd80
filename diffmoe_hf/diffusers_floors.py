"""The lowest diffusers versions diffmoe-hf supports, in one place.

setup.py reads these two constants from this file's text (it must not import the package) to declare
`diffusers>=CORE` for the core install and `diffusers>=TRAIN` for the `[train]` extra; the training script checks
`TRAIN` at start (`diffusers.utils.check_min_version`); `.ci/floor.py` reads them back from the installed metadata.
Keep both as plain string literals.
"""

# the models' apply_lora_scale appears in 0.37; .ci/run tests exactly this version
CORE = "0.37.0"
# LoRA on these models: set_adapters accepts non-diffusers models from diffusers 0.38, and load_lora_weights reads a
# local folder in offline mode without weight_name= from 0.40 (.ci/run tests this floor too)
TRAIN = "0.40.0"
