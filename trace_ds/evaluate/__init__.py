"""Evaluation: preference metrics, target-policy agreement (TPA), perplexity."""
