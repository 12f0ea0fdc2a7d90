"""``trace-ds run``, ``study`` and ``demo``: one YAML config as cached stages (``config``, ``stages``,
``runner``), the efficacy study (``study``), the weighting study (``weighting_study``, ``real_study``) and
the real-model demo (``real_demo``)."""
