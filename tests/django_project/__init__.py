"""A tiny Django project for tests/test_django.py: settings are configured in-process there."""
