"""longitudinal.synth"""
