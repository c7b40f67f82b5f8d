"""Operating a node: kernel and limit checks for N connections (``rawsse tune``).
"""
