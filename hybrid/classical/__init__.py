"""The classical half: Optuna samplers and their warm starts."""
