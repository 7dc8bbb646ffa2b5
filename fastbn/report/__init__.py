"""The pieces of `python -m fastbn`: measurement primitives and inputs (timing), the timed
callables (ops), the one-pass bound (bound), the torch peer process (torch_peer), the
under-load mode (load), the text (table) and the plot (plot). __main__ stays a thin command
line over them.
"""
