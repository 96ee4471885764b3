"""longitudinal.registration"""
