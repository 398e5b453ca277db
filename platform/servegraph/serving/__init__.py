"""The Serve request path: the pipelines' ingress, the model servers' gateways, handle
calls and their merging, HTTP apps, admission, SSE and batching. Imports Ray.
"""
