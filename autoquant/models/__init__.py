"""The models autoquant works on: loading a pipeline (hub id, folder or built-in), where it came
from, the inventory of its quantizable layers, the built-in models, the tiny builders for tests
and the demo's zoo. Imports only ``backends`` and the helpers.
"""
