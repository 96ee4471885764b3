"""longitudinal.forecast"""
