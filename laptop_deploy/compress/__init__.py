"""``laptop-deploy compress``: teacher → pruned (and distilled) student → exported, verified, benchmarked artifact
→ report, in one resumable run folder.

* :mod:`.recipe` — the settings (flags and/or ``--config recipe.toml``), validated as a whole before anything runs;
* :mod:`.stages` — the stage machinery: fingerprints, one subfolder per stage, done-markers, skip / resume / redo;
* :mod:`.steps` — the stages themselves, each a thin call of the library function its verb uses;
* :mod:`.report` — ``report.md`` and its PNGs from the stages' recorded results.
"""
