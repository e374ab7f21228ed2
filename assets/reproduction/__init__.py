"""Reproduction of the papers' claims: seeds, the full comparison set, ablations, learning curves, report."""
