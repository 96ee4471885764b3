"""longitudinal.tracking"""
