"""Running graphs: the runtime that runs a compiled graph's nodes for one request (in-
process or over Serve handles) and the LLM token accounting around each call. Imports
no Ray.
"""
