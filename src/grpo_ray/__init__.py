"""grpo-ray: sweep SFT + GRPO reasoning recipes with Ray Tune + Optuna, export the best trial."""

__version__ = "0.1.0"
