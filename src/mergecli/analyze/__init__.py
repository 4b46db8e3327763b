"""The `analyze` step: analyses of weight averaging, each a `kind` that adds to the report.

Each kind computes plain numbers into ``report["analysis"][kind]``; `mergecli.report` turns
them into ``analysis/KIND.json``, ``analysis/KIND.png`` and ``report.md``.
"""

from mergecli.analyze import (  # noqa: F401 - importing registers the kinds
    averaging,
    coefficients,
    interpolation,
    scaling,
    templates,
)
