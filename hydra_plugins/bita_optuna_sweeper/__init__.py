"""Hydra sweeper plugin `bita_optuna`: an Optuna study through Hydra's sweeper interface."""
