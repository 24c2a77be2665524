"""Phase 1: corpora in (Brown stand-ins, local files, the hub), documents split, a tokenizer
trained or loaded, windows of `seq_len` tokens cut.
"""
