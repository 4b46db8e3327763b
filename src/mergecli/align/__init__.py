"""The `align` step: permutation specs from the graph, matching methods, applying transforms;
it changes the weights of the models it aligns to the reference."""

# Whether the kind's methods shape the merged weights (the report names them after it).
CHANGES_WEIGHTS = True
# The modules whose import registers the kind's methods.
METHOD_MODULES = ("mergecli.align.step", "mergecli.align.zipit_step")
