"""residual-ebm: Residual Energy-Based Models for Text Generation (Deng et al., ICLR 2020).

`pipeline` is the importable library (corpora, tokenization, models, losses, estimators,
samplers, I/O); `stages` wires params.yaml to it, one module per DVC stage.
"""
