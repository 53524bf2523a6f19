"""Training: one loop for the backbones (finetune, refine) and head training on cached features."""
