"""Making images with a pipeline: the render settings and prompt sets, the image loop, prompt
embeddings kept once per study, and calibration (activation statistics recorded while generating,
read by GPTQ). Below ``plans`` because applying a GPTQ recipe to a fresh pipeline calibrates it.
Imports only ``models``, ``backends`` and the helpers.
"""
