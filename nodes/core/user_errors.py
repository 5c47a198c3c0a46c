"""How the pack's exceptions are named where ComfyUI shows them: its console line and its error dialog.

ComfyUI names an exception `module.Class` (execution.py, full_type_name), and it imports a custom node pack under
a module name made from the pack's path (dots replaced by `_x_`), so without this the user would read a cache path
before our sentence. Every exception class the pack raises to the user is decorated with `shown_as_pack`.
"""

SHOWN_MODULE = "ComfyUI-Astria"


def shown_as_pack(cls):
    """Class decorator: the exception reads `ComfyUI-Astria.ClassName: message` in ComfyUI's console and dialog."""
    cls.__module__ = SHOWN_MODULE
    return cls
