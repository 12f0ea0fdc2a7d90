"""Offline judge I/O: export requests, parse responses into verdicts, or run a local model as the judge."""
