"""What the push service means, whatever the wire: Apple's facts and reasons, request validation,
the routes, store-and-forward and the simulated outcomes set at run time. No socket I/O.
"""
