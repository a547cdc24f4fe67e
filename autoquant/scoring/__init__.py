"""Scoring a plan: the evaluator (PSNR and CLIP fidelity against full precision, in stages),
cached reference images, the metrics, CLIP, and the uniform baselines. Imports ``plans`` and every
room below it, never ``search``.
"""
