"""Post-training (report §5): supervised fine-tuning on packed, isolated samples and GRPO."""
