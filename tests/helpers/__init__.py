"""Shared helpers for the pretraining tests (image folders, CLI subprocesses)."""
