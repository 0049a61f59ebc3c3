"""Composes nas_core into experiments: Ray Tune scheduling, MLflow tracking, Table 2, CLI."""
