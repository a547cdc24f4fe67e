"""How a pipeline runs on a device: ``torch.compile`` (regional), layers streamed through the GPU,
the GPU memory plan under a cap, and the latency model. Imports ``generation``, ``models``,
``backends`` and the helpers; ``plans`` imports it (a recipe is applied, then compiled).
"""
