"""Fine-tuning: data preparation, multi-stage context extension, FSDP2."""
