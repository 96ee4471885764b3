"""Longitudinal tumour-growth forecasting from repeated 3D scans."""

__version__ = "0.1.0"
