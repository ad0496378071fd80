"""Parameter-free MoE tensor functions: the routing layout and the grouped GEMMs (custom ops that compile)."""
