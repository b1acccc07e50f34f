"""Plumbing below both components/ and serving/: storage for local paths and gs:// URIs.

Layers point down only: pipeline/ -> components/ -> serving/ -> common/. Nothing here
imports kfp, Keras or a step.
"""
