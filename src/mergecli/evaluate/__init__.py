"""The `evaluate` step: the merged model and baselines scored on data.eval (classifiers:
accuracy; language models: perplexity); it reads weights and never changes them."""

# Whether the kind's methods shape the merged weights (the report names them after it).
CHANGES_WEIGHTS = False
# The modules whose import registers the kind's methods.
METHOD_MODULES = ("mergecli.evaluate.step", "mergecli.evaluate.language_model")
