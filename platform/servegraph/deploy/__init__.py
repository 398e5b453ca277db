"""Deploying and clusters: planning Serve applications, capacity checks, the local Ray
cluster, model fingerprints, simulated models and graph-aware autoscaling. Imports
Ray only inside functions (and in `scaling`'s actors).
"""
