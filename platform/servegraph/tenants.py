"""Tenants: the teams sharing one platform. Every API key belongs to one (the default
tenant unless it was created with another), and every model-server call that reads or
writes documents carries the tenant of the request's key in the field its contract names
(`MethodContract.tenant_field`): the runtime sets it on every such call, over whatever a
pipeline wired, so no pipeline can read another tenant's documents or forget to say
whose it reads. The vector index applies it in its own store (one FAISS index per
tenant, ids unique per tenant). An `admin` key may act for a named tenant
(`X-Servegraph-Tenant`); any other key acts for its own. (The support records `triage`
reads are one shop's customers, not split by tenant: their methods name no tenant.)
"""

from __future__ import annotations

import re

from servegraph.errors import InvalidInputError

DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
TENANT_HEADER = "X-Servegraph-Tenant"
TENANT_RULE = "use 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit"


def check_tenant(tenant: str, field: str = "tenant") -> str:
    """`tenant`, or a 422 naming `field`: lower-case letters, digits, `-` and `_`."""
    if not isinstance(tenant, str) or re.fullmatch(TENANT_PATTERN, tenant) is None:
        raise InvalidInputError(field, f"{str(tenant)[:80]!r} is not a tenant name", TENANT_RULE)
    return tenant
