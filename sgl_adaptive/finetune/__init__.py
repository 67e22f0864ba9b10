"""Fine-tuning the self-evaluator: on-policy data, one-token SFT, evaluation (``sgl-adaptive finetune``)."""
