"""Serving: the local llama.cpp OpenAI application and helpers to start, wait for and stop serve configs."""
