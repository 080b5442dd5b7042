"""Training: the generic Lightning runner, the shared module base and monitor, pretraining and fine-tuning."""
