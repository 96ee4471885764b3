"""longitudinal.data"""
