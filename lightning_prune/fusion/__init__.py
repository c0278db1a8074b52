"""Analysis and surgery: the channel dependency analysis, the rule registry, and in-place narrowing.

It knows masks and layers, never pruners: ``trace`` reads the model, ``walk`` follows every channel through its
rules, ``analysis`` settles what can be pruned (a ``plan``), ``attach`` puts the masks on, and ``apply`` narrows the
modules.
"""
