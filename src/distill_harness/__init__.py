"""The harness around the product: the cluster rehearsal, the labeling-scale simulation, a fake endpoint and
the learning-curve runner. The product package (`distill`) never imports it (tests/test_layering.py)."""
