"""Security: API keys with scopes, per-key rate limits and usage: the one check every HTTP surface
of the platform applies (the pipeline ingress, each model server's gateway, the LLM's
OpenAI routes).

Ray Serve ships no authentication for the data plane, so this is ours:

- **Keys** look like ``sg_<id>_<secret>``: a 12-hex-digit id to find the record, and 32
  random bytes (`secrets.token_urlsafe`) that only the caller holds. The store keeps the
  SHA-256 of the secret, never the key; 256 random bits need no slow password hash
  (nothing to brute-force), and the comparison is constant-time (`hmac.compare_digest`),
  made against a dummy hash too when the id is unknown.
- **The store** is one SQLite file (`AuthSettings.keys`, default
  ``$SERVEGRAPH_HOME/auth/keys.sqlite3``). Every replica keeps what it read, and re-reads
  it when the file changed (a `stat` per request) and at least every
  `AuthSettings.cache_s` (2 s, for filesystems whose modification times lag): a revoked
  key stops working at the next request on local disk, within 2 s anywhere. On a
  cluster the file must be on storage every node mounts (see cluster.yaml).
- **Scopes**: ``invoke:<pipeline>`` or ``invoke:*``; ``write:<pipeline>`` or ``write:*``
  for a pipeline that writes (one that calls a method its contract marks `writes`, e.g.
  ``rag_ingest``); ``llm`` for the OpenAI routes; ``admin`` for everything, including
  the model servers' own REST surfaces.
- **Answers**: no key, a malformed, unknown or revoked one: 401 with
  ``WWW-Authenticate: Bearer``, the same body whichever it was; a valid key without the
  scope: 403 naming the scope; over a limit: 429 with ``Retry-After``. No body, log,
  span or metric carries the key: metrics and spans name the key's *name*.
- **Limits** (requests per second, LLM tokens per minute, set per key) are token
  buckets in one shared actor (`servegraph.security.limits`), so they hold across every ingress
  replica, not per replica. Keys without limits never call it.

The family: `keys` (the key store, key specs, callers and the 401/403/429 error),
`guard` (what a replica checks each request with: the key, the scope, the limits, the
usage metrics), `endpoints` (the FastAPI side: `require` dependencies, the key check
before the body, `guard_endpoint`), `client` (the local admin key, and what a local
client sends) and `limits` (the shared rate and token limits). Imports Ray only inside
functions.
"""
