"""The core every layer stands on: records, the store, safe image decoding, atomic writes, errors, text, sinks.

Nothing here imports from steps, executors, models, the api, the CLI or the UI.
"""
