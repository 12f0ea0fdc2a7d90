"""Training: the hybrid update's loss heads (``losses``: relational, NPO, KL), the vocabulary-chunked LM head
(``vocab_head``), the training loop (``train``), in-run re-scoring (``rescore``), the old model's SFT for the
synthetic benchmark (``sft``) and the export of a trained model (``export``)."""
