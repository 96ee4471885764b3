"""longitudinal.evaluation"""
