"""Offline datasets, fleet generation and data loaders (numpy; sklearn/mnist1d only where loaded)."""
