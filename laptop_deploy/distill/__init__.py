"""Retraining: normalized feature distillation of a pruned student from its teacher.

Takes a teacher and a student (:class:`~laptop_deploy.models.sources.ModelSource`), data (``data.image_data`` /
``data.prompt_data``) and :class:`~.options.DistillOptions`; ``train.prepare_run`` checks and sets up a run folder and
``train.distill`` trains, checkpoints (``state``) and writes the trained student there. The loss is ``loss``.
"""
