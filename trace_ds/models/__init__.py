"""Models: loading from a path or hub id, LoRA and forward settings (``loading``), tiny random models of
every supported family for tests and the synthetic benchmark (``tiny``), and the real chat model prepared
offline from its GGUF file (``real``)."""
