"""The `fit` step: NP Merge and its relatives learn merge coefficients on data; it changes the
merged weights. coefficients.py holds the math, loop.py the optimisation, step.py the step."""

# Whether the kind's methods shape the merged weights (the report names them after it).
CHANGES_WEIGHTS = True
# The modules whose import registers the kind's methods.
METHOD_MODULES = ("mergecli.fit.step",)
