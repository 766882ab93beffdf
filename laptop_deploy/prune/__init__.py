"""Pruning: calibration set → one-shot scores → exact knapsack selection → plan and report.

Takes a :class:`~laptop_deploy.models.sources.ModelSource` and :class:`~.plan.PruneOptions`; gives a
:class:`~.plan.PruningPlan` (removed units, scores, costs, joint output loss, additivity) through
``plan.plan_pruning``, and ``report.plan_markdown`` for people. Criteria are plain functions in
``scoring.CRITERIA``; handcrafted baselines (BK-SDM, KOALA) in ``handcrafted``.
"""
