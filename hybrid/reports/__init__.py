"""Results out of a study: the table of trials (results), the report (report), its plots (plots), the
statistics behind them (stats), and the optuna-dashboard artifacts (dashboard)."""
