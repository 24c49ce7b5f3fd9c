"""The ground floor every other package stands on: the OpenAI wire models, the one error
hierarchy, request events, ``Uncertainty`` and the upstream protocols.

Layers, bottom up (no import runs up this list, not even inside a function; tests/test_layers.py
checks it)::

    protocol  <-  strategies, memory  <-  adapt  <-  evals  <-  server  <-  server/cli.py

``protocol`` imports nothing of sharpen's own.
"""
