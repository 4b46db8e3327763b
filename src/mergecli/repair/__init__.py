"""The `repair` step: BatchNorm statistics reset and REPAIR; it changes the merged weights."""

# Whether the kind's methods shape the merged weights (the report names them after it).
CHANGES_WEIGHTS = True
# The modules whose import registers the kind's methods.
METHOD_MODULES = ("mergecli.repair.step",)
