"""Analysis and surgery: the channel dependency analysis, the rule registry, and in-place narrowing.

It knows masks and layers, never pruners: ``trace`` reads the model, ``walk`` follows every channel through its
rules, ``plan`` settles what can be pruned, ``attach`` puts the masks on, and ``apply`` narrows the modules.
"""
