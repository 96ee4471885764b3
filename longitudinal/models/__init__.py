"""longitudinal.models"""
