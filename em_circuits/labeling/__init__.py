"""labeling"""
