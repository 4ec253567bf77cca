"""Training: one trainer for pre-training and supervised fine-tuning."""
