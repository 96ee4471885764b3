"""longitudinal.ingest"""
