"""The `analyze` step: analyses of weight averaging, each a `kind` that adds to the report.

Each kind computes plain numbers into ``report["analysis"][kind]``; `mergecli.report` turns
them into ``analysis/KIND.json``, ``analysis/KIND.png`` and ``report.md``.
It reads weights and never changes the merged model.
"""

# Whether the kind's methods shape the merged weights (the report names them after it).
CHANGES_WEIGHTS = False
# The modules whose import registers the kind's methods.
METHOD_MODULES = (
    "mergecli.analyze.averaging",
    "mergecli.analyze.coefficients",
    "mergecli.analyze.interpolation",
    "mergecli.analyze.scaling",
    "mergecli.analyze.templates",
)
