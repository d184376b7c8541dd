"""The trial database: what a trial record holds (records), how it is written and kept consistent (store),
the code generations (generations), the structural lease (lease), and the private Optuna APIs (optuna_compat)."""
