"""Runtime runners: one module per runtime, importable as ``laptop_deploy.runtimes.<runtime>``, each with the
``__enter__`` / ``infer(feeds) -> outputs`` / ``__exit__`` lifecycle (see docs/ARCHITECTURE.md). Runtimes arrive
with their issues; nothing is registered yet."""
