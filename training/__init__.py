"""Training scripts for the diffmoe_hf families (installed as `diffmoe_hf.training`); see training/README.md.

- `train_class_conditional.py`: LoRA or full fine-tuning / pre-training of any family, launched with
  `accelerate launch training/train_class_conditional.py ...`.
- `extract_features.py`: encodes an image dataset with the VAE into latent shards (Fast-DiT style).
- `checkpoints.py`: checkpoints written atomically (a kill leaves none half-written) and the choice of one to resume.
- `data.py`: image folders (class folders mapped to the model's class ids, unreadable images found up front), Hub
  datasets and latent shards.
"""
