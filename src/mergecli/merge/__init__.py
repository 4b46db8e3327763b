"""The `merge` step: data-free methods, one module each, over the streaming engine (step.py);
it makes the merged weights."""

# Whether the kind's methods shape the merged weights (the report names them after it).
CHANGES_WEIGHTS = True
# The modules whose import registers the kind's methods.
METHOD_MODULES = (
    "mergecli.merge.average",
    "mergecli.merge.slerp",
    "mergecli.merge.task_arithmetic",
    "mergecli.merge.model_stock",
    "mergecli.merge.breadcrumbs",
    "mergecli.merge.della",
    "mergecli.merge.sce",
    "mergecli.merge.nuslerp",
    "mergecli.merge.multislerp",
    "mergecli.merge.karcher",
    "mergecli.merge.nearswap",
    "mergecli.merge.passthrough",
    "mergecli.merge.fisher",
    "mergecli.merge.regmean",
)
