"""The platform's model servers: one line per server, each a package of `deployments/`
(`deployments/<server>/__init__.py` holds its `SERVER` entry).

Importing this module imports only pydantic models: no Ray, no model.
"""

from __future__ import annotations

from deployments import classifier, embedder, llm, records, vector_index
from servegraph import Catalog

CATALOG = Catalog(
    [
        llm.SERVER,
        embedder.SERVER,
        classifier.SERVER,
        vector_index.SERVER,
        records.SERVER,
    ]
)
