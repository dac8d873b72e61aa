"""Model sources: a user's torch module or Keras model (and weight files) as a model description.

`export/resolve.py: load_model` is the entry point; the converters here are imported lazily so that a
source never imports a framework it does not need.
"""
