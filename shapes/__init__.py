"""The shapes world: a CPU-scale miniature of GenEval-style text-to-image RL.

Coloured geometric shapes on a grey background, GenEval-format prompts for all six tags, a seeded renderer and
an exact classical detector. Modules, one idea each:

- ``shapes.vocab``: colours, classes, counts, relations, tags.
- ``shapes.prompts``: GenEval wording, the combinatorial prompt space, train/test splits (CLI).
- ``shapes.scene``: layout of a metadata record (``SceneConfig``, ``plan_scene``).
- ``shapes.raster``: shape masks and drawing.
- ``shapes.render``: ``render(metadata, rng)`` and ``sample_scene(tag, rng)`` (CLI).
- ``shapes.relations``: GenEval's relative position.
- ``shapes.components`` / ``shapes.detector``: connected components and ``ShapesDetector``.

The package depends on numpy and Pillow only and never imports the services or the trainer.
"""
