"""LM samples: the shared-prefix top-k sampler, the Ray actor pool that runs it, and the
`negatives` stage's shards.
"""
