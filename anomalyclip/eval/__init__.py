"""Evaluation: metrics (AUROC, AP, F1-max, AUPRO), decision thresholds, and the paper's evaluation
protocol (:func:`~anomalyclip.eval.protocol.evaluate`). Import the submodules directly; this package
imports nothing on its own."""
