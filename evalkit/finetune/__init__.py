"""Separate-and-Enhance's compositional finetuning (`python -m evalkit finetune`): losses, checkpoints, training."""
