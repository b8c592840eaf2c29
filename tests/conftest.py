"""Shared fixtures: throwaway database servers (see dbservers.py)."""

pytest_plugins = ["dbservers"]
