"""``python -m quality``: how well the trainer finds segments, and what its gate does when they go.

Prints the K-selection table (automatic K and adjusted Rand index of the trainer's own pipeline
against plain ``StandardScaler`` + ``KMeans(n_init=10)`` at the true K, over scikit-learn's
bundled datasets and synthetic customer data) and the collapse, merge, tiny-segment and outlier
scenarios (gate result, drift signal); writes ``docs/model-quality.md``.
"""
