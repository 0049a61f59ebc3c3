"""Thin FastAPI service over the orchestrator (launch runs from a run spec and query them)."""
