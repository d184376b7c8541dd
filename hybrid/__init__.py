"""hybrid: classical samplers and LLM agents tuning one training script in one Optuna trial database."""
__version__ = "0.1.0"
