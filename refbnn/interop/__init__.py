"""Interoperability with other frameworks (optional extras): ``refbnn.interop.torch``."""
