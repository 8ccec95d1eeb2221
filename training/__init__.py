"""Training: the engine (single process or torchrun DDP, atomic checkpoints, exact resume), the pretraining
recipes of the model families, and fine-tuning. Depends on `hub`; `hub` never imports this package."""
