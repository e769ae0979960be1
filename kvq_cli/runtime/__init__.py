"""The kvq runtime: llama.cpp (through llama-cpp-python) behind one Engine class."""
