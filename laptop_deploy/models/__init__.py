"""Models: turn a spec string into a U-Net (and its pipeline parts) and describe what can be removed from it.

Takes a model spec (``toy``, ``random:<preset>``, a diffusers U-Net / pipeline / student folder, a single-file
checkpoint, a hub id) and gives a :class:`~.sources.ModelSource` (``sources.resolve_model``), the prunable units with
their parameter and MAC costs (``layers.discover_layers``, ``inventory.build_inventory``), and the student format
(``student.make_student`` / ``save_student`` / ``load_student``). ``unet_io`` and ``conditioning`` build the U-Net's
inputs from a config or a prompt, for every later stage.
"""
