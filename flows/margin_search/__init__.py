"""The margin search (flows/tune_margins.py): space, trial, MLflow bookkeeping, driver."""
