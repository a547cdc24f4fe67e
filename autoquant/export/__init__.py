"""Files a plan leaves autoquant in: GGUF (``gguf``, names in ``names``). Each writer makes its
tensors from the original weights with the very code the plan was scored with, and a loader
reads the file back so that it can be scored again. Imports ``plans`` and the rooms below it;
``scoring``, ``search`` and ``cli`` import it.
"""
