"""Evaluation: decoding settings and batched generation, COCO metrics, result tables, galleries.

Import the submodules directly (`bita.eval.metrics`, `bita.eval.evaluate`, ...): this package
imports nothing so that `import bita` stays light.
"""
