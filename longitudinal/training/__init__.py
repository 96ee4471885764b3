"""longitudinal.training"""
