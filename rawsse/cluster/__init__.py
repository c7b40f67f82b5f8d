"""Redis mode: several nodes acting as one push service. The workers' side (ownership claims,
routing through Redis), the node's Redis agent, its mesh end, its records, scripts and pipeline.
"""
