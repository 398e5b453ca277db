"""The graph language: building, validating, compiling, rendering and serialising
pipeline graphs, and the model-server catalog they are checked against. Imports no
Ray.
"""
