"""Around the pipeline, not in it: `rebm plan` (validate params, size every stage) and the
`rebm bench` benchmarks.
"""
