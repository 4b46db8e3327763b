"""Alignment: permutation specs from the graph, matching methods, applying transforms."""
