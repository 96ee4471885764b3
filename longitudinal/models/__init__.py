"""longitudinal.models: pure-torch forecasting models behind one interface (see ``base``).

Importing this package registers every model kind in ``MODEL_KINDS``: one import line per kind's module.
"""

from longitudinal.models import (
    baselines,  # noqa: F401  (registers lci, linear)
    fk,  # noqa: F401  (registers fk)
    np,  # noqa: F401  (registers np)
    tfm,  # noqa: F401  (registers tfm)
)
