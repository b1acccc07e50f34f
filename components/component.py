"""The one decorator every step's KFP component goes through.

It is `@dsl.component` with graft's image and no runtime `pip install kfp` (the image has
it). Inside a running component kfp imports `kfp.dsl` in runtime mode, without the
decorator; a step module imported there must still load, so the decorator steps aside.
"""

from components.config import GRAFT_IMAGE


def step_component(func):
    from kfp import dsl

    if not hasattr(
        dsl, "component"
    ):  # kfp runtime mode (_KFP_RUNTIME=true): executing, not compiling
        return func
    return dsl.component(base_image=GRAFT_IMAGE, install_kfp_package=False)(func)
