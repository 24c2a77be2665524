"""Numbers from samples: log Z bounds (Eq. 4 / Theorem 2), the joint perplexity range,
per-position perplexity (Eq. 5),
LM perplexity, energy scoring, and the evaluate stage's work, convergence and summary.
"""
