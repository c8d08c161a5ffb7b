"""The commands layer: the `trl-prefix-share` CLI (`cli`, `launch`), the demo, and the `bench` and `estimate` tools.

Imports `core` and `trainers`; nothing imports it.
"""
