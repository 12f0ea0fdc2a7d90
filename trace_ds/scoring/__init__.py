"""Stage 2: impact scores (probe set, ghost dot products, the scoring loop)."""
