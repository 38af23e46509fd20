"""Model architectures and their wrappers, one file per architecture.

Each architecture file declares a `Pretrained` record of its published checkpoint;
`registry.published(arch)` finds it.
"""
