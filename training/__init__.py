"""Training scripts for the diffmoe_hf families (installed as `diffmoe_hf.training`); see training/README.md.

- `train_class_conditional.py`: LoRA or full fine-tuning / pre-training of any family, launched with
  `accelerate launch training/train_class_conditional.py ...`.
- `extract_features.py`: encodes an image dataset with the VAE into latent shards (Fast-DiT style).
"""
