"""Streams and the dataflow: event structs, parsing, sources and sinks, the clock, the joiner.

Only this package imports Bytewax, and only in the modules that wire the dataflow."""
