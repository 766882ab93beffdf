"""Deployment contracts shared by every exporter and runtime: the export spec, manifests, parity and latency.

``spec.build_spec`` turns a U-Net config into the one :class:`~.spec.ExportSpec` (input names, shapes, dtypes,
dynamic axes); ``manifest`` writes and reads ``manifest.json`` beside every artifact; ``verify.verify_artifact``
compares an artifact's runner against PyTorch (parity report); ``bench`` times runners.
"""
