"""The networks: the causal LMs (base, BALM, RALM), the masked-LM encoder behind BIT, and the
energy model E(x_{p+1..T} | x_1..p) with its scorer.
"""
