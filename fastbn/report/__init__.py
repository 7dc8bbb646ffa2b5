"""The pieces of `python -m fastbn`: timing and bounds (timing), the torch peer process
(torch_peer) and the plot (plot). __main__ stays a thin command line over them.
"""
