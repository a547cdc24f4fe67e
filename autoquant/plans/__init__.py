"""Plans and what is done with them: the recipe (a versioned file of per-layer configs) and its
name patterns, strict YAML reading, applying a recipe to a pipeline (all or nothing), the record
of what was applied, module swapping, and saved quantized folders. Imports ``runtime``,
``generation``, ``models``, ``backends`` and the helpers, never ``scoring`` or ``search``.
"""
