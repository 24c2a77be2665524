"""Training: one loop with checkpoints and resume, Ray Train on top of it, conditional NCE
(Eq. 3) for the energy, and the causal-LM and masked-LM recipes.
"""
