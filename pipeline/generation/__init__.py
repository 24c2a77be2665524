"""Text out: Algorithm 1 (importance resampling), the sample analyses of section 4.3, and the
human-evaluation sheet and its scoring (Table 2).
"""
