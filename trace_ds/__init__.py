"""trace-ds: realign LLMs to a changed policy with TRACE (triage, impact scores, hybrid update)."""

__version__ = "0.3.0"
