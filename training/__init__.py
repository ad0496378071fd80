"""Training scripts for the diffmoe_hf families (installed as `diffmoe_hf.training`); see training/README.md.

- `train_class_conditional.py`: LoRA or full fine-tuning / pre-training of any family, launched with
  `accelerate launch training/train_class_conditional.py ...`.
- `extract_features.py`: encodes an image dataset with the VAE into latent shards (Fast-DiT style).
- `checkpoints.py`: checkpoints written atomically (a kill leaves none half-written) and the choice of one to resume.
- `data.py`: image folders (class folders mapped to the model's class ids, unreadable images found up front), Hub
  datasets and latent shards.
- `new_classes.py`: a pretrained model fine-tuned on classes it does not have (`--new_classes`): the class table
  rebuilt, the null row kept last; `parameter_groups.py`: what a run trains, by group (the table logged at start);
  `lora_merge.py`: what a LoRA run changes besides its adapter, in checkpoints, and the merged final model.
- `shapes_data.py` / `shapes_recipe.py`: outline shapes drawn with PIL and the scoring of
  `recipes/new_classes_shapes.sh` (fine-tuning on new classes vs training from scratch).
"""
