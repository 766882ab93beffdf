"""Exporters: one module per target, importable as ``laptop_deploy.exporters.<target>``; each consumes the
ExportSpec and writes an artifact plus ``manifest.json`` (see docs/ARCHITECTURE.md). Targets arrive with their
issues; nothing is registered yet."""
