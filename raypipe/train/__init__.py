"""Tuning: conversations and label masks, data, model, FSDP2, Ray Train loop, checkpoints, export."""
