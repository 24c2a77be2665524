"""residual-ebm: Residual Energy-Based Models for Text Generation (Deng et al., ICLR 2020).

`pipeline` is the importable library, one sub-package per phase of the pipeline, each standing
only on the phases before it (tests/test_layout.py):

    core -> data -> models -> sampling -> estimation -> training -> generation -> reporting -> tools

`stages` wires params.yaml to it, one recipe per DVC stage; docs/design.md has the math.
"""
