"""asa3d: anatomy-aware self-supervised pretraining (ASA and peers) on Swin UNETR for 3D CT."""

__version__ = "0.1.0"
