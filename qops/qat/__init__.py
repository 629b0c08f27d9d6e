"""Quantization-aware training: ``config`` (training settings, schemes), ``plan`` (which engine, scheme, format and
queue serve a target; the training config from the spec), ``train`` (the resumable training loop), ``loss``,
``state`` (checkpoints), ``export`` (the trained model in the target's format) and ``job`` (one target's QAT from
the spec's data, and ``qops qat``). Import from the submodules: this package's own import stays light, so the spec
can validate QAT plans without loading the training code."""
